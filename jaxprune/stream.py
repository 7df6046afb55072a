"""Streaming input: a dataset read batch by batch from storage, for data that does not fit
on a device (ImageNet).

`open_stream(name, ...)` returns a `Stream`: random-access sources of the training and test
splits (`tfds.data_source` over array_record, or an npz's or digits' arrays when streaming
is forced) and their host-side augmentation, which grain reads:

* `train_iterator`: every epoch a fresh global permutation (seeded by (seed, epoch)) cut into
  global batches, the remainder dropped as on the device path; process p of P reads slice p
  of every global batch. Each example is augmented with a generator of (seed, its place in
  the run), so the batches do not depend on the number of processes or `workers`. The
  iterator's position (`get_state`) is saved in every training checkpoint, so a resumed run
  reads the batch the uninterrupted run would have read next.
* `test_batches`: the test split in order, the last global batch padded and marked `valid`
  False, as `data.eval_batches` does.

Images of one fixed shape get `data.augment`'s pad, crop and flip; images of varying size
(ImageNet) the papers' random-resized crop to image_size (`_resized_crop`) and a flip, and
for evaluation the shorter side resized to image_size x 256/224 and the centre square.
Batches travel as uint8: normalisation happens on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Iterator

import jax
import numpy as np
from absl import flags

from jaxprune import data
from jaxprune.errors import ConfigError

# How a dataset reaches the training step (setting `input`).
INPUTS = {
    'auto': 'device for digits, npz, cifar10 and cifar100 (they fit on a device); stream for '
            'imagenet2012 and tfds:NAME',
    'device': 'the whole dataset on every device as uint8, batches and augmentation made '
              'inside the compiled step',
    'stream': 'read batch by batch with grain, decoded and augmented on the host',
}
# The datasets `auto` streams, besides every tfds:NAME.
STREAMED = ('imagenet2012',)
# Batches each reading process (the training process or a worker) makes at once.
READ_THREADS = 2


def streams(name: str, input_setting: str) -> bool:
  """Whether dataset `name` is read with grain under `input_setting` (a key of INPUTS)."""
  if input_setting == 'auto':
    return name in STREAMED or name.startswith(data.TFDS_PREFIX)
  return input_setting == 'stream'


# ----------------------------------------------------------------------------- augmentation


@dataclasses.dataclass(frozen=True)
class Augment:
  """The host-side transforms of one dataset (picklable: grain's workers run them)."""
  fixed_shape: bool
  image_size: int
  crop_padding: int = 0
  flip: bool = True
  pad_mode: str = 'zero'

  def train(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    image = (_pad_crop(image, rng, self.crop_padding, self.pad_mode) if self.fixed_shape
             else _resized_crop(image, rng, self.image_size))
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return np.ascontiguousarray(image)

  def test(self, image: np.ndarray) -> np.ndarray:
    if self.fixed_shape:
      return image
    from PIL import Image  # pylint: disable=g-import-not-at-top
    h, w = image.shape[:2]
    shorter = round(self.image_size * (256 / 224))
    scale = shorter / min(h, w)
    size = (max(shorter, round(w * scale)), max(shorter, round(h * scale)))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    top, left = (size[1] - self.image_size) // 2, (size[0] - self.image_size) // 2
    return resized[top:top + self.image_size, left:left + self.image_size]


def _pad_crop(image, rng, padding: int, pad_mode: str) -> np.ndarray:
  if not padding:
    return image
  h, w = image.shape[:2]
  widths = ((padding, padding), (padding, padding), (0, 0))
  padded = np.pad(image, widths, mode='constant' if pad_mode == 'zero' else 'reflect')
  top, left = rng.integers(0, 2 * padding + 1, size=2)
  return padded[top:top + h, left:left + w]


def _resized_crop(image, rng, size: int) -> np.ndarray:
  """torchvision's RandomResizedCrop: area 8-100 %, aspect ratio 3/4-4/3 log-uniform, ten
  tries, then a centre crop."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(0.08, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      break
  else:  # The centre crop of the image's aspect clamped to [3/4, 4/3].
    ratio = w / h
    cw, ch = ((w, round(w / (3 / 4))) if ratio < 3 / 4 else
              (round(h * 4 / 3), h) if ratio > 4 / 3 else (w, h))
    top, left = (h - ch) // 2, (w - cw) // 2
  return np.asarray(Image.fromarray(image).resize(
      (size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch)))


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(eq=False)
class ArraySource:
  """Random access to in-memory images and labels, as records {'image', 'label'}."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {'image': self.images[index], 'label': self.labels[index]}


@dataclasses.dataclass(eq=False)
class _Subset:
  """The records `indices` of `source`, renumbered 0..len-1."""
  source: Any
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return self.source[int(self.indices[index])]


@dataclasses.dataclass(frozen=True, eq=False)
class Stream:
  """A dataset read from storage batch by batch: what `data.Dataset` says of a dataset in
  memory (name, classes, image shape, statistics, sizes), with sources instead of arrays."""
  name: str
  train: Any
  test: Any
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  image_shape: tuple[int, int, int]
  augment: Augment
  fingerprint: str
  workers: int = 0

  @property
  def num_train(self) -> int:
    return len(self.train)

  @property
  def num_test(self) -> int:
    return len(self.test)

  @property
  def spec(self):
    """The device's part: normalisation only (augmentation happened on the host)."""
    return data.DataSpec(mean=self.mean, std=self.std)


def _tfds_stream(name: str, data_dir, max_train, image_size: int, workers: int,
                 pad_mode: str) -> Stream:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder_name = name.removeprefix(data.TFDS_PREFIX)
  data_dir = os.fspath(data_dir) if data_dir else None
  try:
    builder = tfds.builder(builder_name, data_dir=data_dir, file_format='array_record')
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'dataset {name!r}: TFDS has no dataset {builder_name!r} ({e}); give '
                      'tfds:NAME with the name of a TFDS image-classification dataset.',
                      settings=('dataset',)) from e
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ConfigError(f"dataset {name!r} has features {', '.join(features)}; a stream needs "
                      "an image-classification dataset (features 'image' and 'label').",
                      settings=('dataset',))
  test_split = next((s for s in ('test', 'validation') if s in builder.info.splits), 'test')
  train, test = data.tfds_sources(builder_name, data_dir, ('train', test_split))
  shape = tuple(features['image'].shape)
  fixed = None not in shape
  if max_train is not None and max_train < len(train):
    train = _Subset(train, data.subset_indices(len(train), max_train))
  augment = Augment(fixed_shape=fixed, image_size=image_size, crop_padding=4 if fixed else 0,
                    pad_mode=pad_mode)
  # Without published statistics, those of 2000 training examples stand for the dataset's.
  mean, std = data.KNOWN_STATISTICS.get(builder_name) or data.channel_stats(np.stack(
      [augment.test(np.asarray(train[int(i)]['image'], np.uint8))
       for i in data.subset_indices(len(train), 2000)]))
  fingerprint = (f'tfds:{builder_name}:{builder.info.version}:{len(train)}:{len(test)}:'
                 f'{builder.info.dataset_size}')
  return Stream(name=name, train=train, test=test,
                num_classes=int(features['label'].num_classes), mean=mean, std=std,
                image_shape=shape if fixed else (image_size, image_size, shape[-1]),
                augment=augment, fingerprint=fingerprint, workers=workers)


def open_stream(name: str, *, data_path=None, data_dir=None, max_train=None,
                image_size: int = 224, workers: int = 0, pad_mode: str = 'zero') -> Stream:
  """The `Stream` of dataset `name`: a TFDS dataset (cifar10, cifar100, imagenet2012,
  tfds:NAME) prepared as array_record in `data_dir`, or an npz / digits read from memory."""
  try:
    import grain  # pylint: disable=g-import-not-at-top,unused-import
    import PIL  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ConfigError(f"input=stream reads with grain and decodes with Pillow ({e}); install "
                      "them with pip install 'jaxprune[stream]', or use input=device for a "
                      'dataset that fits on a device.', settings=('input',)) from e
  if name in ('npz', 'digits'):
    loaded = data.load(name, data_path=data_path, data_dir=data_dir, max_train=max_train)
    return Stream(name=name, train=ArraySource(loaded.train_images, loaded.train_labels),
                  test=ArraySource(loaded.test_images, loaded.test_labels),
                  num_classes=loaded.num_classes, mean=loaded.mean, std=loaded.std,
                  image_shape=loaded.image_shape, fingerprint=data.fingerprint(loaded),
                  augment=Augment(fixed_shape=True, image_size=loaded.image_shape[0],
                                  crop_padding=loaded.crop_padding, flip=loaded.flip,
                                  pad_mode=pad_mode), workers=workers)
  if data_path is not None:
    raise ConfigError(f'data_path is for dataset=npz, not dataset={name}.',
                      settings=('data_path', 'dataset'))
  return _tfds_stream(name, data_dir, max_train, image_size, workers, pad_mode)


# ----------------------------------------------------------------------------- pipelines


class _TrainPositions:
  """Example k of this process's reading order, for k in 0..epochs x steps x local - 1: step
  k // local's global batch, slice `process` of it (numpy only: grain's workers pickle it)."""

  def __init__(self, source, batch_size: int, local: int, process: int, seed: int,
               epochs: int):
    self.source, self.batch_size, self.local, self.process = source, batch_size, local, process
    self.seed, self.epochs = seed, epochs
    self.steps = len(source) // batch_size
    self._orders: dict = {}

  def __len__(self) -> int:
    return self.epochs * self.steps * self.local

  def order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      self._orders = {epoch: np.random.default_rng([self.seed, 0, epoch]).permutation(
          len(self.source))}
    return self._orders[epoch]

  def __getitem__(self, k: int) -> tuple[int, dict]:
    """(the example's place in the whole run's sequence of global batches, its record)."""
    step, within = divmod(int(k), self.local)
    epoch, index = divmod(step, self.steps)
    position = index * self.batch_size + self.process * self.local + within
    place = step * self.batch_size + position % self.batch_size
    return place, self.source[int(self.order(epoch)[position])]


def _train_example(augment: Augment, seed: int, placed: tuple[int, dict]) -> dict:
  """Augments a `_TrainPositions` (place, record) with a generator of (seed, place)."""
  place, record = placed
  rng = np.random.default_rng([seed, 1, place])
  return {'image': augment.train(np.asarray(record['image'], np.uint8), rng),
          'label': np.int32(record['label'])}


class _TestPositions:
  """Example k of this process's share of the test split's global batches (`test_batches`)."""

  def __init__(self, source, batch_size: int, local: int, process: int, augment: Augment):
    self.source, self.batch_size, self.local, self.process = source, batch_size, local, process
    self.augment = augment
    self.steps = -(-len(source) // batch_size)

  def __len__(self) -> int:
    return self.steps * self.local

  def __getitem__(self, k: int) -> dict:
    step, within = divmod(int(k), self.local)
    position = step * self.batch_size + self.process * self.local + within
    valid = position < len(self.source)
    record = self.source[position if valid else 0]
    return {'image': self.augment.test(np.asarray(record['image'], np.uint8)),
            'label': np.int32(record['label']), 'valid': np.bool_(valid)}


def _local_batch(batch_size: int) -> int:
  count = jax.process_count()
  if batch_size % count:
    raise ConfigError(f'batch_size {batch_size} is not divisible by the {count} processes.',
                      settings=('batch_size',))
  return batch_size // count


def _iterator(dataset, workers: int):
  import grain  # pylint: disable=g-import-not-at-top
  # Each element is a whole batch: a few in flight per reader keep memory bounded.
  iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                                       prefetch_buffer_size=2 * READ_THREADS))
  if workers:
    # grain's workers read its absl flags; outside an absl program they keep their defaults.
    flags.FLAGS.mark_as_parsed()
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(iterable)


def train_iterator(stream: Stream, *, seed: int, batch_size: int, epochs: int):
  """This process's slices of every training batch of `epochs` epochs, as grain iterator
  of {'image': uint8 (local, H, W, C), 'label': int32 (local,)}; `get_state()` /
  `set_state()` save and restore its position."""
  import grain  # pylint: disable=g-import-not-at-top
  local = _local_batch(batch_size)
  positions = _TrainPositions(stream.train, batch_size, local, jax.process_index(), seed, epochs)
  dataset = (grain.MapDataset.source(positions)
             .map(functools.partial(_train_example, stream.augment, seed))
             .batch(local, drop_remainder=True))
  return _iterator(dataset, stream.workers)


def test_batches(stream: Stream, batch_size: int) -> Iterator[dict]:
  """This process's slices of the test split's global batches: {'image', 'label', 'valid'}."""
  import grain  # pylint: disable=g-import-not-at-top
  local = _local_batch(batch_size)
  positions = _TestPositions(stream.test, batch_size, local, jax.process_index(), stream.augment)
  return _iterator(grain.MapDataset.source(positions).batch(local), stream.workers)


def scoring_batches(stream: Stream, batch_size: int, count: int, seed: int) -> Iterator[dict]:
  """`count` unaugmented training batches (the evaluation transform) in a seeded order, the
  whole batch on every process: what data-driven criteria read."""
  order = np.random.default_rng(seed).permutation(stream.num_train)
  for i in range(min(count, stream.num_train // batch_size)):
    records = [stream.train[int(j)] for j in order[i * batch_size:(i + 1) * batch_size]]
    yield {'image': np.stack([stream.augment.test(np.asarray(r['image'], np.uint8))
                              for r in records]),
           'label': np.asarray([r['label'] for r in records], np.int32)}


_normalize = jax.jit(data.normalize, static_argnums=(1, 2))


def to_device(host: dict, sharding, spec: data.DataSpec) -> dict:
  """A batch of every process's slices as global arrays on `sharding` (split over the batch
  axis), its images normalised as `data.normalize` does on the device path."""
  placed = {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in host.items()}
  placed['image'] = _normalize(placed['image'], spec.mean, spec.std)
  return placed
