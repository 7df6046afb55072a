r"""Input throughput: images/s of the streaming input's host work (JPEG decoding, augmentation,
batching) per host core, on ImageNet-like JPEGs it writes, and the host cores a device step of
R images/s needs (bench README, section 14).
"""

import io
import math
import os
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging

import common

FLAGS = flags.FLAGS
flags.DEFINE_integer('images', 512, 'Distinct JPEGs written.', lower_bound=1)
flags.DEFINE_integer('records', 2560, 'Records in each split (the JPEGs repeated): one pass '
                     'of each is timed.', lower_bound=1)
flags.DEFINE_integer('image_size', 224, 'Side of the square crops (open_stream image_size).',
                     lower_bound=1)
flags.DEFINE_integer('batch', 64, 'Batch size.', lower_bound=1)
flags.DEFINE_list('workers', ['0', '1', '2'], 'Decoding worker processes, one measurement '
                  'each (0: threads of this process).')
flags.DEFINE_list('device_images_per_second', [], 'Training-step rates (images/s) of devices '
                  'to feed: the host cores each needs at the measured train rate.')
flags.DEFINE_string('data_dir', None, 'TFDS data_dir for the JPEGs (default: a temporary '
                    'one, removed at the end); reused when it holds them already.')
flags.DEFINE_string('out', None, 'Write the table as JSON here.')
common.validate_entries('workers', int, lambda w: w >= 0,
                        '--workers entries are whole numbers >= 0, e.g. 0,1,2.')
common.validate_entries('device_images_per_second', float, lambda r: r > 0,
                        '--device_images_per_second entries are images/s above 0, e.g. '
                        '3000,12000.')

NAME = 'input_throughput_jpegs'
# Smooth noise of (cells across the long side, amplitude) and per-pixel grain: at quality 90
# a JPEG of ImageNet's average size (bench README, section 14).
OCTAVES = ((4, 50.0), (16, 30.0), (64, 25.0), (160, 20.0))
GRAIN = 16.0


def photo_jpeg(rng: np.random.Generator) -> bytes:
  """A quality-90 JPEG that costs what an ImageNet photo costs to decode, sized as those are:
  mostly 500 pixels on the long side, 4:3 to 3:2, a quarter portrait."""
  from PIL import Image
  long_side = int(rng.integers(450, 500, endpoint=True))
  short_side = round(long_side / rng.uniform(1.25, 1.5))
  h, w = (long_side, short_side) if rng.random() < 0.25 else (short_side, long_side)
  image = np.full((h, w, 3), 128.0, np.float32)
  for cells, amplitude in OCTAVES:
    grid = (max(2, cells * h // max(h, w)), max(2, cells * w // max(h, w)))
    for c in range(3):
      small = rng.normal(0, amplitude, grid).astype(np.float32)
      image[..., c] += np.asarray(Image.fromarray(small, 'F').resize((w, h), Image.BICUBIC))
  image += rng.normal(0, GRAIN, image.shape).astype(np.float32)
  out = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out, format='JPEG', quality=90)
  return out.getvalue()


class InputThroughputJpegs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """--records records (1000 classes) per split, the --images photos repeated; unregistered, as
  grain's workers unpickle the TFDS builder the stream reads them with, without this script."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=1000)}))

  def _split_generators(self, dl_manager):
    rng = np.random.default_rng(0)
    files = [photo_jpeg(rng) for _ in range(FLAGS.images)]
    return {'train': self._generate_examples(files), 'test': self._generate_examples(files)}

  def _generate_examples(self, files):
    for i in range(FLAGS.records):
      yield i, {'image': io.BytesIO(files[i % len(files)]), 'label': i % 1000}


def prepare(data_dir: str) -> float:
  """Writes NAME into `data_dir` unless it is there; the mean KB of its records."""
  builder = InputThroughputJpegs(data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    start = time.perf_counter()
    builder.download_and_prepare()
    print(f'wrote {FLAGS.images} JPEGs as 2 splits of {FLAGS.records} records to {data_dir} '
          f'in {time.perf_counter() - start:.1f} s', flush=True)
  held = builder.info.splits['train'].num_examples
  if held != FLAGS.records:
    raise app.UsageError(f'--data_dir {data_dir} holds {NAME} with {held} records per split, '
                         f'not --records={FLAGS.records}; give --records={held} or another '
                         '--data_dir.')
  return int(builder.info.dataset_size) / (2 * held) / 1e3


def cpu_seconds() -> float:
  """CPU seconds of this process and of its descendants, living (grain's workers) or ended (a
  process's time passes to its parent's children_* once the parent has waited for it)."""
  import psutil
  ended = os.times()
  total = time.process_time() + ended.children_user + ended.children_system
  for child in psutil.Process().children(recursive=True):
    try:
      times = child.cpu_times()
    except psutil.NoSuchProcess:  # Waited for between the listing and the reading: counted
      continue                    # in its parent's children_* from then on.
    total += times.user + times.system + times.children_user + times.children_system
  return total


def main():
  logging.set_verbosity(logging.WARNING)
  from jaxprune import stream

  warmup = stream.READ_THREADS * max(1, *(int(w) for w in FLAGS.workers))
  if FLAGS.records // FLAGS.batch <= warmup:
    raise app.UsageError(
        f'--records={FLAGS.records} makes {FLAGS.records // FLAGS.batch} batches of --batch='
        f'{FLAGS.batch}, none left to time after the first round of {warmup} (2 per process); '
        f'give --records={(warmup + 1) * FLAGS.batch} or more.')
  with tempfile.TemporaryDirectory() as scratch:
    data_dir = FLAGS.data_dir or scratch
    jpeg_kb = prepare(data_dir)
    rows = []
    for workers in (int(w) for w in FLAGS.workers):
      s = stream.open_stream(f'tfds:{NAME}', data_dir=data_dir, image_size=FLAGS.image_size,
                             workers=workers)
      cores = max(1, workers)
      first_round = stream.READ_THREADS * cores
      for transform, batches, count in (
          ('train', stream.train_iterator(s, seed=0, batch_size=FLAGS.batch, epochs=1),
           s.num_train // FLAGS.batch),
          ('test', stream.test_batches(s, FLAGS.batch), -(-s.num_test // FLAGS.batch))):
        for _ in range(first_round):
          next(batches)
        cpu, start = cpu_seconds(), time.perf_counter()
        images = sum(len(next(batches)['label']) for _ in range(count - first_round))
        # Up to the last batch's arrival: the end of the iterator would add the workers' exit.
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        batches.close()
        rate = images / seconds
        rows.append({'workers': workers, 'transform': transform, 'images': images,
                     'seconds': seconds, 'images_per_s': rate, 'cores': cores,
                     'images_per_s_per_core': rate / cores, 'cpu_s': cpu,
                     'cores_busy': cpu / seconds, 'images_per_cpu_s': images / cpu,
                     'load_average': os.getloadavg()[0]})
        print(common.format_table([rows[-1]]).splitlines()[-1], flush=True)

  reference = max((r for r in rows if r['transform'] == 'train'), key=lambda r: r['workers'])
  per_core = reference['images_per_cpu_s']
  feeds = [{'device_images_per_s': float(r), 'host_cores': math.ceil(float(r) / per_core)}
           for r in FLAGS.device_images_per_second]
  print(f'\nhost input of tfds:{NAME} ({FLAGS.images} JPEGs, {jpeg_kb:.0f} KB per record), '
        f'{FLAGS.image_size}x{FLAGS.image_size}, batch {FLAGS.batch}, one pass of '
        f'{FLAGS.records} records after the first round of batches; cores: worker processes '
        '(0: 1); images_per_cpu_s: per CPU second of this process and its workers')
  print(common.format_table(rows))
  print(f'\nper-core train rate: {per_core:.1f} images per CPU second ({reference["workers"]} '
        'workers); host cores a device needs = ceil(its images/s / that rate)')
  if feeds:
    print(common.format_table(feeds, floats='.6g'))
  common.write_json(FLAGS.out, images=FLAGS.images, records=FLAGS.records, jpeg_kb=jpeg_kb,
                    image_size=FLAGS.image_size, batch=FLAGS.batch, rows=rows,
                    per_core_train_images_per_cpu_s=per_core,
                    reference_workers=reference['workers'], feeds=feeds)


if __name__ == '__main__':
  common.run(main)
