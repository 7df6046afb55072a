r"""Epoch throughput with data loading: `train.fit` against a PyTorch DataLoader loop that
augments as torchvision does, one process per measurement (bench README, section 8).
"""

import tempfile
import time

import numpy as np
from absl import app, flags

import common

FLAGS = flags.FLAGS
common.define_comparison_flags(rounds=2)
flags.DEFINE_string('data_path', None, 'The CIFAR-10 sample (.npz: uint8 NHWC train/test '
                    'images and labels); required.')
flags.DEFINE_integer('images', 2048, 'Training images per epoch.', lower_bound=1)
flags.DEFINE_integer('epochs', 3, 'Epochs per measurement, the first one the warm-up.',
                     lower_bound=2)
flags.DEFINE_list('loader_workers', sorted({0, min(4, common.THREADS)}),
                  'PyTorch DataLoader worker processes: one torch measurement per entry '
                  '(0 loads in the training process).')
common.validate_entries('loader_workers', str, str.isdigit,
                        '--loader_workers entries are whole numbers >= 0.')


def jax_worker(name: str) -> dict:
  import jax

  from jaxprune import data, models, train
  from jaxprune.train import checkpoint

  dataset = data.load('npz', data_path=FLAGS.data_path, max_train=FLAGS.images)
  model = models.build(name, dataset.num_classes)
  variables = models.init(model, jax.random.key(0), dataset.image_shape)
  with tempfile.TemporaryDirectory() as stage:
    _, result = train.fit(model, variables, data.device_put_dataset(dataset), dataset.spec,
                          train.TrainOptions(epochs=FLAGS.epochs, batch_size=FLAGS.batch),
                          stage_dir=stage)
    records = checkpoint.read_metrics(stage)
  return {'framework': 'jax', 'device': jax.devices()[0].device_kind,
          'epoch_images_per_s': [r['images_per_second'] for r in records],
          'train_loss': result['train_loss']}


def torch_worker(name: str) -> dict:
  import torch
  workers = int(FLAGS.loader_workers[0])
  device, train_step = common.torch_training(name, FLAGS.threads)
  with np.load(FLAGS.data_path) as npz:
    images = npz['train_images'][:FLAGS.images]
    labels = npz['train_labels'][:FLAGS.images].astype(np.int64)
  loader = torch.utils.data.DataLoader(
      AugmentedCifar(images, labels), batch_size=FLAGS.batch, shuffle=True, drop_last=True,
      num_workers=workers, pin_memory=device.type == 'cuda', persistent_workers=workers > 0)
  rates = []
  for _ in range(FLAGS.epochs):
    start, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
    for x, y in loader:
      x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
      loss_sum += train_step(x, y)[1].detach()
      seen += x.shape[0]
    train_loss = float(loss_sum) / (seen // FLAGS.batch)  # waits for the device
    rates.append(seen / (time.perf_counter() - start))
  return {'framework': 'torch', 'device': str(device), 'torch': torch.__version__,
          'torch_threads': torch.get_num_threads(), 'loader_workers': workers,
          'epoch_images_per_s': rates, 'train_loss': train_loss}


class AugmentedCifar:
  """uint8 NHWC images -> normalised float32 CHW tensors, randomly cropped (pad 4) and flipped."""

  def __init__(self, images, labels):
    self.mean = images.reshape(-1, 3).mean(0) / 255
    self.std = images.reshape(-1, 3).std(0) / 255
    self.images = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    self.labels = labels

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    import torch
    top, left = np.random.randint(0, 9, 2)
    image = self.images[i, top:top + 32, left:left + 32]
    if np.random.rand() < 0.5:
      image = image[:, ::-1]
    image = (image.astype(np.float32) / 255 - self.mean) / self.std
    return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), np.float32)),
            int(self.labels[i]))


def main():
  common.require_data_path(FLAGS.data_path)
  common.check_models(FLAGS.models, FLAGS.frameworks)
  from jaxprune import data
  available = len(data.load('npz', data_path=FLAGS.data_path).train_labels)
  if FLAGS.images > available:
    raise app.UsageError(f'--images={FLAGS.images} exceeds the {available} training images '
                         f'in {FLAGS.data_path}.')
  configs = {'jax fit': ['--worker=jax']} if 'jax' in FLAGS.frameworks else {}
  if 'torch' in FLAGS.frameworks:
    configs.update({f'torch, {w} loader workers': ['--worker=torch', f'--loader_workers={w}']
                    for w in FLAGS.loader_workers})
  runs, rows = common.compare(
      configs, lambda r: common.median(r['epoch_images_per_s'][1:]),
      lambda rs: {'device': rs[0]['device'], 'first_epoch_images_per_s': common.median(
          [r['epoch_images_per_s'][0] for r in rs])})
  print(f"\n{FLAGS.images} training images, batch {FLAGS.batch}, float32, {FLAGS.epochs} "
        f"epochs (median of epochs 2-{FLAGS.epochs}, then of {FLAGS.rounds} rounds); torch "
        f"threads {FLAGS.threads}; vs_torch = this epoch throughput / the fastest torch "
        "configuration's (GPU target >= 1.5)")
  print(common.format_table(rows))
  common.write_json(FLAGS.out, images=FLAGS.images, batch=FLAGS.batch, epochs=FLAGS.epochs,
                    rows=rows, runs=runs)


if __name__ == '__main__':
  common.run(main, lambda kind: (jax_worker if kind == 'jax' else torch_worker)(FLAGS.model))
