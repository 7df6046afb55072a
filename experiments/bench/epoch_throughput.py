r"""Epoch throughput, data loading included: `train.fit` against a standard PyTorch CIFAR loop.

    python experiments/bench/epoch_throughput.py --data_path=NPZ --out=epoch_throughput.json

The project's GPU target is stated for whole epochs, input pipeline included; this script
measures exactly that on any backend (the CPU here, a GPU where one is available).
For each model (VGG-16 and ResNet-56, float32, batch 128) and --images training images of
the CIFAR-10 sample npz (jax: `data.load`'s fixed random subset of that size, as
`launch.py --max_train` takes it; torch: the first --images; both: all of them at the
sample's 10000):
  * jax: `jaxprune.train.fit` as `launch.py` runs it: the dataset on the device, the epoch's
    permutation, crops and flips made there, one host sync per epoch, an asynchronous
    checkpoint and a test-set evaluation after every epoch. Its epoch images/s is
    `metrics.jsonl`'s `images_per_second` (the training phase of the epoch);
  * torch: the usual PyTorch reference loop: a `torch.utils.data.DataLoader` over the
    uint8 images (shuffled; each --loader_workers entry's worker processes, one torch
    measurement per entry; pinned memory on a GPU)
    whose dataset pads by 4, crops 32x32 at random, flips at random and normalises each
    image (what torchvision's RandomCrop(32, padding=4), RandomHorizontalFlip and
    Normalize do; torchvision is not needed), copying each batch to the device, then
    SGD (momentum 0.9, weight decay 1e-4) on the same network
    (experiments/bench/torch_models.py); cudnn.benchmark on a GPU; images/s over the
    epoch's loop, waited for at its end.
The first epoch (jax: compilation; torch: worker start-up and cudnn autotuning) is
reported separately; the table's images/s is the median of the later epochs. Each
measurement runs in its own process and the configurations alternate for --rounds rounds.
vs_torch divides by the fastest torch configuration.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['vgg16', 'resnet56'], 'Models (jaxprune registry names).')
flags.DEFINE_list('frameworks', ['jax', 'torch'], 'Frameworks to time.')
flags.DEFINE_string('data_path', None, 'The CIFAR-10 sample (.npz: uint8 NHWC train/test '
                    'images and labels); required.')
flags.DEFINE_integer('images', 2048, 'Training images per epoch (the first N of the npz).',
                     lower_bound=1)
flags.DEFINE_integer('batch', 128, 'Batch size.', lower_bound=1)
flags.DEFINE_integer('epochs', 3, 'Epochs per measurement; the first is the warm-up.')
flags.DEFINE_integer('rounds', 2, 'Alternating rounds (one process per framework and round).',
                     lower_bound=1)
flags.DEFINE_integer('threads', len(os.sched_getaffinity(0)),
                     'torch.set_num_threads; XLA uses one thread per available core.',
                     lower_bound=1)
flags.DEFINE_list('loader_workers', sorted({0, min(4, len(os.sched_getaffinity(0)))}),
                  'PyTorch DataLoader worker processes: one torch measurement per entry '
                  '(0 loads in the training process).')
flags.DEFINE_string('out', None, 'Write the table as JSON here.')
flags.DEFINE_string('worker', None, 'Internal: run one measurement (jax or torch).')
flags.DEFINE_string('model', None, 'Internal: the worker\'s model.')


def jax_worker(name: str) -> dict:
  import jax
  import numpy as np

  from jaxprune import data, models, train
  from jaxprune.train import checkpoint

  dataset = data.load('npz', data_path=FLAGS.data_path, max_train=FLAGS.images)
  model = models.build(name, dataset.num_classes)
  variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1,) + dataset.image_shape,
                                                               np.float32))
  with tempfile.TemporaryDirectory() as stage:
    _, result = train.fit(model, variables, data.device_put_dataset(dataset), dataset.spec,
                          train.TrainOptions(epochs=FLAGS.epochs, batch_size=FLAGS.batch),
                          stage_dir=stage)
    records = checkpoint.read_metrics(stage)
  return {'framework': 'jax', 'device': jax.devices()[0].device_kind,
          'epoch_images_per_s': [r['images_per_second'] for r in records],
          'train_loss': result['train_loss']}


def torch_worker(name: str) -> dict:
  import numpy as np
  import torch
  import torch_models

  torch.set_num_threads(FLAGS.threads)
  torch.manual_seed(0)
  workers = int(FLAGS.loader_workers[0])
  device = common.torch_device()
  with np.load(FLAGS.data_path) as npz:
    images = npz['train_images'][:FLAGS.images]
    labels = npz['train_labels'][:FLAGS.images].astype(np.int64)
  mean = images.reshape(-1, 3).mean(0) / 255
  std = images.reshape(-1, 3).std(0) / 255
  loader = torch.utils.data.DataLoader(
      _AugmentedCifar(images, labels, mean, std), batch_size=FLAGS.batch, shuffle=True,
      drop_last=True, num_workers=workers, pin_memory=device.type == 'cuda',
      persistent_workers=workers > 0)
  model = torch_models.build(name).to(device).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  rates, loss_sum = [], None
  for _ in range(FLAGS.epochs):
    start, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
    for x, y in loader:
      x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
      opt.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(model(x), y)
      loss.backward()
      opt.step()
      loss_sum += loss.detach()
      seen += x.shape[0]
    train_loss = float(loss_sum) / (seen // FLAGS.batch)  # waits for the device
    rates.append(seen / (time.perf_counter() - start))
  return {'framework': 'torch', 'device': str(device), 'torch': torch.__version__,
          'torch_threads': torch.get_num_threads(), 'loader_workers': workers,
          'epoch_images_per_s': rates, 'train_loss': train_loss}


class _AugmentedCifar:
  """uint8 NHWC images -> normalised float32 CHW tensors, randomly cropped (pad 4) and flipped."""

  def __init__(self, images, labels, mean, std):
    import numpy as np
    self.images = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    self.labels, self.mean, self.std = labels, mean, std

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    import numpy as np
    import torch
    top, left = np.random.randint(0, 9, 2)
    image = self.images[i, top:top + 32, left:left + 32]
    if np.random.rand() < 0.5:
      image = image[:, ::-1]
    image = (image.astype(np.float32) / 255 - self.mean) / self.std
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), np.float32)), int(
        self.labels[i])


def main(argv):
  del argv
  if FLAGS.worker:
    common.reply((jax_worker if FLAGS.worker == 'jax' else torch_worker)(FLAGS.model))
    return
  common.require_data_path(FLAGS.data_path)
  if FLAGS.epochs < 2:
    raise app.UsageError(f'--epochs must be at least 2 (the first is the warm-up), got '
                         f'{FLAGS.epochs}.')
  common.check_models(FLAGS.models, FLAGS.frameworks)
  from jaxprune import data
  available = len(data.load('npz', data_path=FLAGS.data_path).train_labels)
  if FLAGS.images > available:
    raise app.UsageError(f'--images={FLAGS.images} exceeds the {available} training images '
                         f'in {FLAGS.data_path}.')
  try:
    workers = [int(w) for w in FLAGS.loader_workers]
  except ValueError:
    workers = [-1]
  if min(workers) < 0:
    raise app.UsageError(f'--loader_workers {FLAGS.loader_workers} are not whole numbers >= 0.')
  script = os.path.abspath(__file__)
  base = [f'--data_path={FLAGS.data_path}', f'--images={FLAGS.images}', f'--batch={FLAGS.batch}',
          f'--epochs={FLAGS.epochs}', f'--threads={FLAGS.threads}']
  configs = [('jax', None)] if 'jax' in FLAGS.frameworks else []
  if 'torch' in FLAGS.frameworks:
    configs += [('torch', w) for w in workers]
  runs = []
  for name in FLAGS.models:
    for r in range(FLAGS.rounds):
      for framework, loader_workers in configs:
        args = [f'--worker={framework}', f'--model={name}']
        if loader_workers is not None:
          args.append(f'--loader_workers={loader_workers}')
        res = common.run_worker(script, base + args)
        res.update(model=name, round=r, load_average=os.getloadavg()[0])
        runs.append(res)
        later = res['epoch_images_per_s'][1:]
        label = framework if loader_workers is None else f'{framework} ({loader_workers} workers)'
        print(f"{name:9s} {label:19s} round {r}: {common.median(later):7.1f} images/s "
              f"(first epoch {res['epoch_images_per_s'][0]:.1f}), load "
              f"{res['load_average']:.1f}", flush=True)

  rows = []
  for name in FLAGS.models:
    model_rows = []
    for framework, loader_workers in configs:
      rs = [r for r in runs if r['model'] == name and r['framework'] == framework
            and r.get('loader_workers') == loader_workers]
      per_round = [common.median(r['epoch_images_per_s'][1:]) for r in rs]
      model_rows.append({
          'model': name, 'framework': framework,
          'loader_workers': '-' if loader_workers is None else loader_workers,
          'device': rs[0]['device'], 'images_per_s': common.median(per_round),
          'range': f'{min(per_round):.1f}-{max(per_round):.1f}',
          'first_epoch_images_per_s': common.median([r['epoch_images_per_s'][0] for r in rs]),
          'rounds': len(rs)})
    torch_rates = [row['images_per_s'] for row in model_rows if row['framework'] == 'torch']
    for row in model_rows:
      row['vs_torch'] = row['images_per_s'] / max(torch_rates) if torch_rates else None
    rows += model_rows
  print()
  print(f"{FLAGS.images} training images, batch {FLAGS.batch}, float32, {FLAGS.epochs} epochs "
        f"(median of epochs 2-{FLAGS.epochs}, then of {FLAGS.rounds} rounds); torch threads "
        f"{FLAGS.threads}; vs_torch = this epoch throughput / the fastest torch "
        "configuration's (GPU target >= 1.5)")
  print(common.format_table(rows, list(rows[0])))
  common.write_json(FLAGS.out, {'machine': common.machine(), 'images': FLAGS.images,
                                'batch': FLAGS.batch, 'epochs': FLAGS.epochs, 'rows': rows,
                                'runs': runs})


if __name__ == '__main__':
  common.run(main)
