"""Datasets onto the device as uint8, and batches made from them inside jit.

`load(name, ...)` reads a dataset into host memory as a `Dataset`:

* `cifar10`, `cifar100`, `tfds:NAME`: `tfds.data_source` over array_record files. Preparing
  one (download and write, with TensorFlow: `pip install 'jaxprune[prepare]'`) is a step of
  its own; loading one that is not prepared is one sentence saying how, never a download.
* `npz`: a `.npz` file of `NPZ_KEYS`: images uint8 NHWC (rank 4: add a grayscale channel axis
  with `images[..., None]`), labels rank-1 integers, the classes 0..K-1 each with a training
  example unless a scalar `num_classes` entry fixes them, so a stray label (255 among 0..9) is
  refused rather than taken for 246 new classes. Mean/std from all its training images.
* `digits`: scikit-learn's bundled 8x8 digits (no download) scaled to uint8, split 1437
  train / 360 test by a fixed permutation; no flip (a mirrored digit is another symbol).

`max_train` keeps a fixed random subset of the training examples, the same for every run;
the test set is always whole and mean/std never depend on the subset.

Device side (pure functions with explicit PRNG keys, callable inside jit):
`device_put_dataset` once, then `epoch_permutation`, `train_batch` (pad, random crop and
random flip as in the pruning papers; normalise) and `eval_batches`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import zipfile
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import ConfigError, DataError, choose

NPZ_KEYS = ('train_images', 'train_labels', 'test_images', 'test_labels')

# The datasets that need no preparing; ends every sentence refusing a TFDS dataset.
_ALTERNATIVES = "use dataset=npz with data_path=FILE.npz, or dataset=digits"
# The settings data errors may name (a command line shows them as its flags).
_SETTINGS = ('dataset', 'data_path', 'data_dir')


# How the random crop's border is filled (`augment`).
PAD_MODES = {
    'zero': 'black borders, padded before normalisation ([R]; torchvision RandomCrop(32, 4))',
    'reflect': "the image mirrored into the border ([C]'s code)",
}


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What augmentation and normalisation need: hashable, so it can be a static jit argument."""
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_padding: int = 0
  flip: bool = False
  pad_mode: str = 'zero'


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A whole dataset as host numpy arrays (uint8 NHWC images, int32 labels); `mean` / `std`
  per channel in [0, 1] units, `crop_padding` and `flip` its default augmentation."""
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_padding: int = 4
  flip: bool = True

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])

  @property
  def num_train(self) -> int:
    return len(self.train_labels)

  @property
  def num_test(self) -> int:
    return len(self.test_labels)

  @property
  def spec(self) -> DataSpec:
    return DataSpec(mean=self.mean, std=self.std, crop_padding=self.crop_padding, flip=self.flip)


# ----------------------------------------------------------------------------- host-side loading


def fingerprint(ds: Dataset) -> str:
  """A digest of the dataset's content (every image and label, and the class count): the
  same file rewritten with other data is another dataset."""
  digest = hashlib.blake2b(digest_size=12)
  for array in (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels):
    array = np.ascontiguousarray(array)
    digest.update(f'{array.dtype.str}{array.shape}'.encode())
    digest.update(memoryview(array).cast('B'))
  digest.update(str(ds.num_classes).encode())
  return 'blake2b:' + digest.hexdigest()


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of uint8 NHWC images, in [0, 1] units (exact, from a 256-bin
  histogram per channel rather than a float copy)."""
  means, stds = [], []
  values = np.arange(256, dtype=np.float64)
  for c in range(images.shape[-1]):
    counts = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
    n = counts.sum()
    mean = (counts * values).sum() / n
    var = (counts * (values - mean) ** 2).sum() / n
    means.append(float(mean / 255.0))
    stds.append(float(np.sqrt(var) / 255.0))
  return tuple(means), tuple(stds)


def _positive_int(what: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ConfigError(f"{what} must be a positive integer, got {value!r}.", settings=(what,))
  return int(value)


def subset_indices(n: int, max_train: int | None) -> np.ndarray:
  """A fixed random subset of range(n) of size max_train, in increasing order."""
  if max_train is None or max_train >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(0).permutation(n)[:max_train])


def _subset(images, labels, max_train):
  keep = subset_indices(len(labels), max_train)
  return images[keep], labels[keep]


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
  """The runs of consecutive integers in sorted, distinct `values`: [(first, last), ...]."""
  runs = np.split(values, np.flatnonzero(np.diff(values) != 1) + 1)
  return [(int(run[0]), int(run[-1])) for run in runs]


def _describe_runs(runs: list[tuple[int, int]], most: int = 4) -> str:
  """'0..9, 255' (at most `most` runs, then how many more)."""
  words = [str(a) if a == b else f'{a}..{b}' for a, b in runs[:most]]
  if len(runs) > most:
    words.append(f'and {len(runs) - most} more runs')
  return ', '.join(words)


def _check_label_type(path: str, split: str, labels: np.ndarray) -> None:
  """Refuses labels that are not a rank-1 array of integers, naming a non-integer one."""
  if labels.ndim != 1:
    raise DataError(f"npz file {path!r}: {split}_labels has shape {labels.shape} but must be "
                    "integer class indices of shape (N,).")
  if np.issubdtype(labels.dtype, np.integer):
    return
  whole = labels.dtype == np.bool_
  example = ''
  if np.issubdtype(labels.dtype, np.floating):
    fractional = ~np.isfinite(labels) | (labels != np.round(labels))
    whole = not fractional.any()
    if not whole:
      i = int(np.argmax(fractional))
      example = f' ({split}_labels[{i}] is {labels[i]})'
  fix = f'; its values are whole numbers: store {split}_labels.astype(np.int64)' if whole else ''
  raise DataError(f"npz file {path!r}: {split}_labels has dtype {labels.dtype}{example} but "
                  f"must hold integer class indices{fix}.")


# What a file's labels must be, ending every sentence that refuses them.
_LABELS_ALLOWED = ("an npz file without num_classes must label its classes 0..K-1 with every "
                   "class in its training labels, or store num_classes (its labels then lie "
                   "in 0..num_classes-1)")


def _num_classes(path: str, arrays: Mapping[str, np.ndarray]) -> int:
  """The class count of an npz file (the module docstring's rule); a label outside the classes
  or a class without or with far too few training examples is refused, naming where it is."""
  train_labels, test_labels = arrays['train_labels'], arrays['test_labels']
  if 'num_classes' in arrays:
    num_classes = arrays['num_classes']
    if (num_classes.shape != () or not np.issubdtype(num_classes.dtype, np.integer)
        or num_classes < 1):
      raise DataError(f"npz file {path!r}: num_classes must be a positive integer scalar, "
                      f"got {num_classes!r}.")
    num_classes = int(num_classes)
    for split, labels in (('train', train_labels), ('test', test_labels)):
      outside = (labels < 0) | (labels >= num_classes)
      if outside.any():
        i = int(np.argmax(outside))
        others = int(outside.sum()) - 1
        tail = (f" (and {others:,} more label{'s' if others > 1 else ''} outside it)"
                if others else '')
        raise DataError(f"npz file {path!r}: {split}_labels[{i}] is {labels[i]}, but its "
                        f"num_classes={num_classes} allows only labels 0..{num_classes - 1}"
                        f"{tail}.")
    return num_classes
  for split, labels in (('train', train_labels), ('test', test_labels)):
    negative = labels < 0
    if negative.any():
      i = int(np.argmax(negative))
      raise DataError(f"npz file {path!r}: {split}_labels[{i}] is {labels[i]}, a negative "
                      f"label; {_LABELS_ALLOWED}.")
  present = np.unique(train_labels)
  runs = _runs(present)
  # The classes without a training example: below the first run and between runs.
  gaps = [(b + 1, a - 1) for (_, b), (a, _) in zip([(-1, -1)] + runs, runs) if a > b + 1]
  if gaps:
    above = gaps[0][1] + 1  # the first label above the first class without an example
    missing = sum(b - a + 1 for a, b in gaps)
    what = 'class' if missing == 1 else f'{missing:,} classes'
    where = int(np.argmax(train_labels == above))
    raise DataError(f"npz file {path!r}: the training labels {_describe_runs(runs)} leave "
                    f"{what} {_describe_runs(gaps)} without a training example (label {above} "
                    f"is train_labels[{where}]); {_LABELS_ALLOWED}.")
  num_classes = int(present[-1]) + 1
  counts = np.bincount(train_labels, minlength=num_classes)
  average = len(train_labels) / num_classes
  # Under 1 % of the average count is more likely a stray label (one 10 among 0-9) than a class.
  rare = np.flatnonzero(counts < 0.01 * average)
  if len(rare):
    label = int(rare[-1])
    raise DataError(f"npz file {path!r}: label {label} occurs {counts[label]} time(s) against "
                    f"{average:.0f} per class on average (train_labels["
                    f"{int(np.argmax(train_labels == label))}]); if it is right, store "
                    f"num_classes={num_classes} in the npz.")
  beyond = test_labels >= num_classes
  if beyond.any():
    i = int(np.argmax(beyond))
    raise DataError(f"npz file {path!r}: test_labels[{i}] is {test_labels[i]}, beyond the "
                    f"training labels 0..{num_classes - 1}; {_LABELS_ALLOWED}.")
  return num_classes


def _load_npz(data_path, max_train) -> Dataset:
  if not data_path:
    raise ConfigError("dataset=npz needs data_path=FILE.npz.", settings=_SETTINGS)
  path = os.fspath(data_path)
  try:
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.lib.npyio.NpzFile):
      with loaded:
        arrays = {k: loaded[k] for k in loaded.files}
  except FileNotFoundError:
    raise DataError(f"npz file {path!r} does not exist.") from None
  except IsADirectoryError:
    raise DataError(f"npz file {path!r} is a directory.") from None
  except (zipfile.BadZipFile, EOFError) as e:  # a truncated or damaged archive
    raise DataError(f"npz file {path!r} is damaged (truncated or corrupted: "
                    f"{str(e).rstrip('.')}); write it again.") from e
  except ValueError as e:
    if not zipfile.is_zipfile(path):
      # np.load takes what is neither .npy nor a zip for a pickle, which we do not load.
      raise DataError(f"{path!r} is not an npz archive (np.savez writes one).") from e
    raise DataError(f"cannot read npz file {path!r}: {str(e).rstrip('.')}.") from e
  except OSError as e:
    raise DataError(f"cannot read npz file {path!r}: {e.strerror or e}.") from e
  if not isinstance(loaded, np.lib.npyio.NpzFile):
    raise DataError(f"{path!r} holds one array of shape {loaded.shape} (np.save writes one), "
                    f"not an npz archive of {', '.join(NPZ_KEYS)} (np.savez writes one).")
  missing = [k for k in NPZ_KEYS if k not in arrays]
  if missing:
    raise DataError(f"npz file {path!r} lacks {', '.join(missing)}; it needs "
                    f"{', '.join(NPZ_KEYS)}.")
  for split in ('train', 'test'):
    images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
    if images.ndim != 4 or 0 in images.shape[1:]:
      raise DataError(f"npz file {path!r}: {split}_images has shape {images.shape} (rank "
                      f"{images.ndim}) but must be NHWC of rank 4 with H, W, C >= 1 (for "
                      "grayscale add a channel axis: images[..., None]).")
    if images.dtype != np.uint8:
      raise DataError(f"npz file {path!r}: {split}_images has dtype {images.dtype} but must "
                      "be uint8 in 0..255.")
    _check_label_type(path, split, labels)
    if len(images) != len(labels):
      raise DataError(f"npz file {path!r}: {split}_images has {len(images)} images but "
                      f"{split}_labels has {len(labels)} labels.")
    if len(images) == 0:
      raise DataError(f"npz file {path!r}: {split}_images is empty.")
  train_shape, test_shape = arrays['train_images'].shape[1:], arrays['test_images'].shape[1:]
  if train_shape != test_shape:
    raise DataError(f"npz file {path!r}: train images are {train_shape} but test images are "
                    f"{test_shape}; both must have the same HWC shape.")
  num_classes = _num_classes(path, arrays)
  mean, std = channel_stats(arrays['train_images'])
  train_images, train_labels = _subset(arrays['train_images'], arrays['train_labels'], max_train)
  return Dataset(name='npz', train_images=np.ascontiguousarray(train_images),
                 train_labels=train_labels.astype(np.int32), num_classes=num_classes,
                 test_images=np.ascontiguousarray(arrays['test_images']),
                 test_labels=arrays['test_labels'].astype(np.int32), mean=mean, std=std)


def _load_digits(max_train) -> Dataset:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(labels))
  train, test = order[:-360], order[-360:]
  mean, std = channel_stats(images[train])
  train_images, train_labels = _subset(images[train], labels[train], max_train)
  return Dataset(
      name='digits', train_images=train_images, train_labels=train_labels,
      test_images=images[test], test_labels=labels[test], num_classes=10,
      mean=mean, std=std, crop_padding=1, flip=False)


def _load_tfds(name, data_dir, max_train) -> Dataset:
  """A TFDS image-classification dataset of fixed-shape images, read whole."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder_name = name.removeprefix(TFDS_PREFIX)
  train, test = tfds_sources(builder_name, data_dir, ('train', 'test'))
  features = tfds.builder(builder_name, data_dir=data_dir).info.features
  if None in tuple(features['image'].shape):
    raise ConfigError(f"dataset={name} has images of varying size "
                      f"{tuple(features['image'].shape)}, which cannot be held on a device "
                      'as one array; read it with input=stream.', settings=('dataset', 'input'))
  train_images, train_labels = _read_records(train, max_train)
  test_images, test_labels = _read_records(test, None)
  mean, std = KNOWN_STATISTICS.get(builder_name) or channel_stats(train_images)
  return Dataset(name=name, train_images=train_images, train_labels=train_labels,
                 test_images=test_images, test_labels=test_labels,
                 num_classes=int(features['label'].num_classes), mean=mean, std=std)


def tfds_sources(name: str, data_dir, splits: tuple[str, ...]) -> list:
  """Random-access sources of TFDS dataset `name`'s `splits`, prepared as array_record (the
  only format data_source reads). Never prepares one: a missing one is a ConfigError."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.fspath(data_dir) if data_dir else None
  where = repr(data_dir) if data_dir else 'the default TFDS data_dir'
  try:
    return tfds.data_source(name, split=list(splits), data_dir=data_dir, download=False,
                            builder_kwargs={'file_format': 'array_record'})
  except Exception as e:  # pylint: disable=broad-except
    prepare = (f"tfds build {name} --file_format=array_record"
               + (f' --data_dir={data_dir}' if data_dir else ''))
    if tfds.builder(name, data_dir=data_dir, file_format='array_record').is_prepared():
      raise ConfigError(
          f"{name} in {where} is prepared but cannot be read with tfds.data_source ({e}); "
          f"prepare it as array_record ({prepare}), or {_ALTERNATIVES}.", settings=_SETTINGS) from e
    raise ConfigError(
        f"{name} is not prepared in {where}; prepare it once with {prepare} (TensorFlow and "
        f"network access needed: pip install 'jaxprune[prepare]'), or pass data_dir=DIR holding "
        f"a prepared array_record copy, or {_ALTERNATIVES}.", settings=_SETTINGS) from e


def _read_records(source, limit) -> tuple[np.ndarray, np.ndarray]:
  """The records of a random-access source (`subset_indices` of `limit`) as stacked arrays;
  one `__getitems__` call lets array_record fetch them in parallel."""
  keep = subset_indices(len(source), limit)
  records = source.__getitems__(keep.tolist())
  images = np.stack([np.asarray(r['image'], dtype=np.uint8) for r in records])
  labels = np.fromiter((r['label'] for r in records), dtype=np.int32, count=len(keep))
  return images, labels


TFDS_PREFIX = 'tfds:'
# Published training-set statistics (population std), in [0, 1] units, by TFDS name.
KNOWN_STATISTICS = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'imagenet2012': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# dataset value -> the optional arguments of load it reads (giving one it ignores is a mistake).
DATASETS: Mapping[str, set[str]] = {
    'cifar10': {'data_dir'}, 'cifar100': {'data_dir'}, 'imagenet2012': {'data_dir'},
    'npz': {'data_path'}, 'digits': set()}
# What else `dataset` may be: any TFDS image-classification dataset by its TFDS name.
OTHER_DATASETS = ('tfds:NAME (a TFDS image-classification dataset prepared as array_record)',
                  lambda value: isinstance(value, str) and value.startswith(TFDS_PREFIX)
                  and len(value) > len(TFDS_PREFIX))


def load(name: str, data_path=None, data_dir=None, max_train: int | None = None) -> Dataset:
  """Loads dataset `name` (a key of `DATASETS`, or tfds:NAME of fixed-shape images; not
  `imagenet2012`, which streams) into host memory. `data_path` is the .npz file (`npz`
  only), `data_dir` the TFDS data directory (TFDS datasets only), `max_train` the size of the
  fixed training subset (None: all). Raises ConfigError for an unknown name, an argument the
  dataset does not use, a malformed npz file (`DataError`) or a TFDS dataset not prepared."""
  if not OTHER_DATASETS[1](name):
    choose('dataset', name, DATASETS)
  for arg, value in (('data_path', data_path), ('data_dir', data_dir)):
    if value is not None and arg not in DATASETS.get(name, {'data_dir'}):
      raise ConfigError(f"{arg} is not used by dataset={name}; it is for "
                        f"{', '.join(n for n, uses in DATASETS.items() if arg in uses)}.",
                        settings=_SETTINGS)
  if max_train is not None:
    max_train = _positive_int('max_train', max_train)
  if name == 'imagenet2012':
    raise ConfigError(f'dataset={name} does not fit on a device (its images vary in size); '
                      'read it with input=stream (or input=auto).', settings=('dataset', 'input'))
  if name == 'npz':
    return _load_npz(data_path, max_train)
  if name == 'digits':
    return _load_digits(max_train)
  return _load_tfds(name, data_dir, max_train)


# -------------------------------------------------- device side: pure and jittable (`spec` static)


def device_put_dataset(ds: Dataset, sharding=None) -> dict[str, jax.Array]:
  """The dataset's arrays on device by `NPZ_KEYS`: images uint8 (4x smaller than float32),
  labels int32, all on `sharding` (default: replicated over all devices)."""
  if sharding is None:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def put(key):
    x = np.asarray(getattr(ds, key), np.uint8 if key.endswith('images') else np.int32)
    # One device, many devices or many hosts alike: each host supplies its shards from its copy.
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return {key: put(key) for key in NPZ_KEYS}


def steps_per_epoch(n: int, batch_size: int) -> int:
  """Full training batches per epoch (the remainder is dropped, a fresh one each epoch)."""
  batch_size = _positive_int('batch_size', batch_size)
  if batch_size > n:
    raise ConfigError(f"batch_size {batch_size} exceeds the {n} training examples.",
                      settings=('batch_size',))
  return n // batch_size


def epoch_permutation(rng: jax.Array, n: int, batch_size: int) -> jax.Array:
  """(steps, batch_size) int32 example indices for one epoch: a random permutation of
  range(n) with the last n % batch_size dropped. `n` and `batch_size` are static."""
  steps = steps_per_epoch(n, batch_size)
  perm = jax.random.permutation(rng, n)
  return perm[:steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)


def augment(images: jax.Array, rng: jax.Array, crop_padding: int, flip: bool,
            pad_mode: str = 'zero') -> jax.Array:
  """Per image: pads `crop_padding` pixels each side (`pad_mode`, a key of PAD_MODES), crops
  back to H x W at a uniform offset, and mirrors left-right with probability 1/2 if `flip`.
  Keeps the dtype; the last three arguments are static; 0 and False is the identity."""
  choose('pad_mode', pad_mode, PAD_MODES, setting='pad_mode')
  b, h, w, _ = images.shape
  crop_key, flip_key = jax.random.split(rng)
  if crop_padding:
    widths = ((0, 0), (crop_padding, crop_padding), (crop_padding, crop_padding), (0, 0))
    padded = jnp.pad(images, widths, mode='constant' if pad_mode == 'zero' else 'reflect')
    offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * crop_padding + 1)

    def crop(image, offset):
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

    images = jax.vmap(crop)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
    images = jnp.where(mirror, images[:, :, ::-1, :], images)
  return images


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """uint8 pixels -> float32 (x / 255 - mean) / std, per channel."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def train_batch(images: jax.Array, labels: jax.Array, indices: jax.Array, rng: jax.Array,
                spec: DataSpec) -> dict[str, jax.Array]:
  """One augmented, normalised training batch {'image': float32 NHWC, 'label': int32 (B,)}
  from the on-device training arrays, one row of `epoch_permutation` and a fresh key."""
  batch = augment(jnp.take(images, indices, axis=0), rng, spec.crop_padding, spec.flip,
                  spec.pad_mode)
  return {'image': normalize(batch, spec.mean, spec.std),
          'label': jnp.take(labels, indices, axis=0).astype(jnp.int32)}


@functools.partial(jax.jit, static_argnames='spec')
def _eval_batch(images, labels, indices, valid, spec: DataSpec) -> dict[str, jax.Array]:
  return {'image': normalize(jnp.take(images, indices, axis=0), spec.mean, spec.std),
          'label': jnp.take(labels, indices, axis=0).astype(jnp.int32),
          'valid': jnp.asarray(valid, jnp.bool_)}


def eval_batches(images: jax.Array, labels: jax.Array, batch_size: int,
                 spec: DataSpec) -> Iterator[dict[str, jax.Array]]:
  """The test set in order, normalised and unaugmented, as batches {'image': float32,
  'label': int32, 'valid': bool} of `batch_size`. The last one is padded with example 0
  marked valid=False (one shape, one compile): weight every metric by `valid`."""
  batch_size = _positive_int('batch_size', batch_size)
  n = int(labels.shape[0])
  for start in range(0, n, batch_size):
    index = np.arange(start, start + batch_size)
    valid = index < n
    yield _eval_batch(images, labels, np.where(valid, index, 0).astype(np.int32), valid, spec)
