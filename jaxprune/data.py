"""Datasets onto the device as uint8, and batches made from them inside jit.

Loading (host, numpy) -- `load(name, ...)` returns a `Dataset`:

* `cifar10`, `cifar100`: read through `tfds.data_source` (random access over
  array_record files; no TensorFlow needed to *read*). Preparing (downloading and
  writing) a dataset that is not yet in `data_dir` is TFDS's job and needs
  TensorFlow (`pip install 'jaxprune[prepare]'`) and network access; without
  either we stop with one sentence saying how to proceed. Mean/std are the
  standard CIFAR training-set values.
* `npz`: any `.npz` file with `train_images`, `train_labels`, `test_images`,
  `test_labels`; images uint8 NHWC (rank 4: a grayscale (N, H, W) array is
  rejected, add the channel axis with `images[..., None]`), labels integers of
  rank 1 and >= 0. An optional scalar `num_classes` entry fixes the number of
  classes (labels must then lie below it); otherwise it is the largest training label
  + 1; a label below 1% of the average class count (where that is 100 or more) and a
  test label beyond the training labels are refused rather than taken for new classes.
  Mean/std are computed from all training images in the file.
* `digits`: scikit-learn's bundled 8x8 handwritten digits (1797 images, no
  download), values 0..16 scaled to uint8 0..255 (round(v * 255 / 16)), shape
  (N, 8, 8, 1), split by a fixed permutation (numpy seed 0) into 1437 train /
  360 test images. Mean/std from the training split; crop padding 1, no flip
  (a mirrored digit is a different symbol).

`max_train` keeps a fixed random subset of `max_train` training examples (the
same for every run; files sorted by class, such as the CIFAR-10 sample, still give
every class); the test set is always complete and mean/std never depend on it.

Device side (pure functions with explicit PRNG keys, callable inside jit):
`device_put_dataset` puts the arrays on the device(s) once; per epoch
`epoch_permutation` draws (steps, batch) indices; `train_batch` gathers, augments
(zero-pad + random crop + random horizontal flip, as in the pruning papers) and
normalises one batch; `eval_indices` / `eval_batch` / `eval_batches` walk the
test set in order, padding the last batch and marking it with `valid`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import socket
import zipfile
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import errors
from jaxprune.errors import ConfigError, DataError, choose

NPZ_KEYS = ('train_images', 'train_labels', 'test_images', 'test_labels')

# How to go on without preparing a TFDS dataset; ends every "cannot prepare" sentence.
_ALTERNATIVES = ("pass data_dir=DIR holding a prepared TFDS copy (array_record), or use "
                 "dataset=npz with data_path=FILE.npz, or dataset=digits")
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
  """A whole dataset as host numpy arrays (uint8 NHWC images, int32 labels).

  `mean` / `std` are per channel in [0, 1] units (pixel / 255); `crop_padding`
  and `flip` are the dataset's default training augmentation.
  """
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


# ---------------------------------------------------------------------------------------------
# Host-side loading.


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
  """Per-channel mean and std of uint8 NHWC images, in [0, 1] units.

  Exact and memory-light: a 256-bin histogram per channel instead of a float copy.
  """
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


def _subset_indices(n: int, max_train: int | None) -> np.ndarray:
  """A fixed random subset of range(n) of size max_train, in increasing order."""
  if max_train is None or max_train >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(0).permutation(n)[:max_train])


def _subset(images, labels, max_train):
  keep = _subset_indices(len(labels), max_train)
  return images[keep], labels[keep]


# A label this much rarer than the average class is taken for a mislabelled example, not a
# class, unless the file says how many classes it has; judged only where the average class
# has enough examples to tell.
_RARE_CLASS_FRACTION = 0.01
_RARE_CLASS_MIN_MEAN = 100


def _classes_from_labels(path: str, train_labels: np.ndarray, test_labels: np.ndarray) -> int:
  """The class count of an npz without `num_classes`: the training labels' 0..max; a label
  far rarer than the rest, or a test label beyond them, is refused rather than taken for a
  new class."""
  if min(train_labels.min(), test_labels.min()) < 0:
    return int(max(train_labels.max(), test_labels.max())) + 1  # refused by the range check
  counts = np.bincount(train_labels)
  num_classes = len(counts)
  hint = '; if it is right, store num_classes={} in the npz'
  mean = counts.mean()
  rare = np.flatnonzero((counts > 0) & (counts < _RARE_CLASS_FRACTION * mean))
  if mean >= _RARE_CLASS_MIN_MEAN and rare.size:
    raise DataError(f"npz file {path!r}: label {rare[0]} occurs {counts[rare[0]]} time(s) "
                    f"against {mean:,.0f} per class on average{hint.format(num_classes)}.")
  outside = test_labels[(test_labels < 0) | (test_labels >= num_classes)]
  if outside.size:
    raise DataError(f"npz file {path!r}: test label {outside[0]} lies outside the training "
                    f"labels 0..{num_classes - 1}{hint.format(int(test_labels.max()) + 1)}.")
  return num_classes


def _load_npz(data_path, data_dir, max_train) -> Dataset:
  del data_dir
  if not data_path:
    raise ConfigError("dataset=npz needs data_path=FILE.npz.", settings=_SETTINGS)
  path = os.fspath(data_path)
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
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
  missing = [k for k in NPZ_KEYS if k not in arrays]
  if missing:
    raise DataError(f"npz file {path!r} lacks {', '.join(missing)}; it needs "
                      f"{', '.join(NPZ_KEYS)}.")
  for split in ('train', 'test'):
    images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
    if images.ndim != 4:
      raise DataError(f"npz file {path!r}: {split}_images has shape {images.shape} (rank "
                        f"{images.ndim}) but must be NHWC of rank 4 (for grayscale add a "
                        "channel axis: images[..., None]).")
    if images.dtype != np.uint8:
      raise DataError(f"npz file {path!r}: {split}_images has dtype {images.dtype} but must "
                        "be uint8 in 0..255.")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise DataError(f"npz file {path!r}: {split}_labels has shape {labels.shape} and dtype "
                        f"{labels.dtype} but must be integers of shape (N,).")
    if len(images) != len(labels):
      raise DataError(f"npz file {path!r}: {split}_images has {len(images)} images but "
                        f"{split}_labels has {len(labels)} labels.")
    if len(images) == 0:
      raise DataError(f"npz file {path!r}: {split}_images is empty.")
  train_shape, test_shape = arrays['train_images'].shape[1:], arrays['test_images'].shape[1:]
  if train_shape != test_shape:
    raise DataError(f"npz file {path!r}: train images are {train_shape} but test images are "
                      f"{test_shape}; both must have the same HWC shape.")
  lowest = min(int(arrays['train_labels'].min()), int(arrays['test_labels'].min()))
  highest = max(int(arrays['train_labels'].max()), int(arrays['test_labels'].max()))
  if 'num_classes' in arrays:
    num_classes = arrays['num_classes']
    if num_classes.shape != () or not np.issubdtype(num_classes.dtype, np.integer) or num_classes < 1:
      raise DataError(f"npz file {path!r}: num_classes must be a positive integer scalar, "
                        f"got {num_classes!r}.")
    num_classes = int(num_classes)
  else:
    num_classes = _classes_from_labels(path, arrays['train_labels'], arrays['test_labels'])
  if lowest < 0 or highest >= num_classes:
    raise DataError(f"npz file {path!r}: labels range over {lowest}..{highest} but must lie "
                      f"in 0..{num_classes - 1}.")
  mean, std = channel_stats(arrays['train_images'])
  train_images, train_labels = _subset(arrays['train_images'], arrays['train_labels'], max_train)
  return Dataset(
      name='npz',
      train_images=np.ascontiguousarray(train_images),
      train_labels=train_labels.astype(np.int32),
      test_images=np.ascontiguousarray(arrays['test_images']),
      test_labels=arrays['test_labels'].astype(np.int32),
      num_classes=num_classes, mean=mean, std=std, crop_padding=4, flip=True)


DIGITS_NUM_TEST = 360
DIGITS_SEED = 0


def _load_digits(data_path, data_dir, max_train) -> Dataset:
  del data_path, data_dir
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(DIGITS_SEED).permutation(len(labels))
  train, test = order[:-DIGITS_NUM_TEST], order[-DIGITS_NUM_TEST:]
  mean, std = channel_stats(images[train])
  train_images, train_labels = _subset(images[train], labels[train], max_train)
  return Dataset(
      name='digits', train_images=train_images, train_labels=train_labels,
      test_images=images[test], test_labels=labels[test], num_classes=10,
      mean=mean, std=std, crop_padding=1, flip=False)


@dataclasses.dataclass(frozen=True)
class _Tfds:
  """A TFDS image-classification dataset read with `tfds.data_source`."""
  name: str
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  download_host: str  # probed before TFDS starts its (minutes-long) retrying download

  def __call__(self, data_path, data_dir, max_train) -> Dataset:
    del data_path
    train, test = _tfds_sources(self, data_dir)
    train_images, train_labels = _read_records(train, max_train)
    test_images, test_labels = _read_records(test, None)
    return Dataset(
        name=self.name, train_images=train_images, train_labels=train_labels,
        test_images=test_images, test_labels=test_labels, num_classes=self.num_classes,
        mean=self.mean, std=self.std, crop_padding=4, flip=True)


def _tensorflow_available() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def _reachable(host: str, port: int = 443, timeout: float = 5.0) -> bool:
  try:
    socket.create_connection((host, port), timeout=timeout).close()
    return True
  except OSError:
    return False


def _tfds_sources(spec: _Tfds, data_dir):
  """(train, test) random-access sources, preparing the dataset first if it is missing."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = repr(os.fspath(data_dir)) if data_dir else 'the default TFDS data_dir'
  # data_source only reads array_record; with an explicit data_dir TFDS would otherwise
  # prepare in its default tfrecord format, which it then cannot read back.
  kwargs = dict(split=['train', 'test'], data_dir=data_dir,
                builder_kwargs={'file_format': 'array_record'})
  try:
    return tfds.data_source(spec.name, download=False, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    builder = tfds.builder(spec.name, data_dir=data_dir, file_format='array_record')
    if builder.is_prepared():
      raise ConfigError(
          f"{spec.name} in {where} is prepared but cannot be read with tfds.data_source ({e}); "
          f"prepare it as array_record (tfds build {spec.name} --file_format=array_record), or "
          "use dataset=npz with data_path=FILE.npz, or dataset=digits.", settings=_SETTINGS) from e
  # Not prepared: fail fast, before TFDS retries a download for minutes or downloads
  # 170 MB only to find TensorFlow missing when it starts writing.
  if not _reachable(spec.download_host):
    raise ConfigError(
        f"{spec.name} is not prepared in {where} and cannot be downloaded ({spec.download_host} "
        f"is unreachable, we seem to be offline); {_ALTERNATIVES}.", settings=_SETTINGS)
  if not _tensorflow_available():
    raise ConfigError(
        f"{spec.name} is not prepared in {where} and preparing it needs TensorFlow, which is "
        f"not installed: pip install 'jaxprune[prepare]' (tensorflow-cpu), or {_ALTERNATIVES}.",
        settings=_SETTINGS)
  try:
    return tfds.data_source(spec.name, download=True, **kwargs)
  except ImportError as e:
    raise ConfigError(
        f"preparing {spec.name} in {where} needs the missing Python module {e.name!r} "
        f"(pip install 'jaxprune[prepare]'), or {_ALTERNATIVES}.", settings=_SETTINGS) from e
  except (OSError, tfds.download.DownloadError) as e:  # requests' ConnectionError is an OSError
    raise ConfigError(
        f"{spec.name} is not prepared in {where} and downloading it failed ({e}); "
        f"{_ALTERNATIVES}.", settings=_SETTINGS) from e


def _read_records(source, limit) -> tuple[np.ndarray, np.ndarray]:
  """All records (or the fixed random subset of `limit`, see `max_train`) of a random-access source as stacked arrays.

  One `__getitems__` call lets array_record fetch the records in parallel rather than
  one seek per image.
  """
  keep = _subset_indices(len(source), limit)
  n = len(keep)
  records = source.__getitems__(keep.tolist())
  images = np.stack([np.asarray(r['image'], dtype=np.uint8) for r in records])
  labels = np.fromiter((r['label'] for r in records), dtype=np.int32, count=n)
  return images, labels


# Standard CIFAR training-set statistics (population std), in [0, 1] units.
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

# dataset value -> loader(data_path, data_dir, max_train) -> Dataset.
DATASETS: Mapping[str, Callable[..., Dataset]] = {
    'cifar10': _Tfds('cifar10', 10, _CIFAR10_MEAN, _CIFAR10_STD, 'www.cs.toronto.edu'),
    'cifar100': _Tfds('cifar100', 100, _CIFAR100_MEAN, _CIFAR100_STD, 'www.cs.toronto.edu'),
    'npz': _load_npz,
    'digits': _load_digits,
}

# Which of load's optional arguments each dataset reads; giving one it ignores is a mistake.
_USES = {'cifar10': {'data_dir'}, 'cifar100': {'data_dir'}, 'npz': {'data_path'}, 'digits': set()}


def load(name: str, data_path=None, data_dir=None, max_train: int | None = None) -> Dataset:
  """Loads dataset `name` (a key of `DATASETS`) into host memory.

  Args:
    name: `cifar10`, `cifar100`, `npz` or `digits`.
    data_path: the .npz file (`npz` only).
    data_dir: the TFDS data directory (`cifar10` / `cifar100` only; default TFDS's own).
    max_train: keep a fixed random subset of `max_train` training examples (None: all).

  Raises:
    ConfigError: unknown name, an argument the dataset does not use, a malformed npz
      file, or a TFDS dataset that is not prepared and cannot be prepared here.
  """
  errors.choose('dataset', name, DATASETS)
  given = {'data_path': data_path, 'data_dir': data_dir}
  for arg, value in given.items():
    if value is not None and arg not in _USES[name]:
      raise ConfigError(f"{arg} is not used by dataset={name}; it is for "
                        f"{', '.join(n for n, u in _USES.items() if arg in u)}.",
                        settings=_SETTINGS)
  if max_train is not None:
    max_train = _positive_int('max_train', max_train)
  return DATASETS[name](data_path, data_dir, max_train)


# ---------------------------------------------------------------------------------------------
# Device side: everything below is pure and jittable (`spec` static).


def _put(x: np.ndarray, sharding):
  # make_array_from_callback works for one device, many devices and many hosts alike
  # (each host supplies its own shards from the same host copy).
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def device_put_dataset(ds: Dataset, sharding=None) -> dict[str, jax.Array]:
  """The dataset's arrays on device: {'train_images', 'train_labels', 'test_images', 'test_labels'}.

  Images stay uint8 (4x smaller than float32; CIFAR-10 takes 184 MB). `sharding`
  (one `jax.sharding.Sharding` for all four arrays) defaults to replicated over
  all devices.
  """
  if sharding is None:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return {
      'train_images': _put(np.asarray(ds.train_images, np.uint8), sharding),
      'train_labels': _put(np.asarray(ds.train_labels, np.int32), sharding),
      'test_images': _put(np.asarray(ds.test_images, np.uint8), sharding),
      'test_labels': _put(np.asarray(ds.test_labels, np.int32), sharding),
  }


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
  """Random crop (after padding `crop_padding` pixels each side) and random horizontal flip.

  Per image, independently: the (H + 2p, W + 2p) padded image is cropped back to H x W
  at an offset drawn uniformly from {0..2p}^2, then mirrored left-right with
  probability 1/2 when `flip`. `pad_mode` is a key of PAD_MODES: 'zero' (black borders,
  padded before normalisation) or 'reflect'. Keeps the dtype; `crop_padding`, `flip`
  and `pad_mode` are static. With crop_padding=0 and flip=False it is the identity.
  """
  choose('pad_mode', pad_mode, PAD_MODES, setting='pad_mode')
  b, h, w, _ = images.shape
  crop_key, flip_key = jax.random.split(rng)
  if crop_padding:
    p = crop_padding
    widths = ((0, 0), (p, p), (p, p), (0, 0))
    padded = (jnp.pad(images, widths) if pad_mode == 'zero'
              else jnp.pad(images, widths, mode='reflect'))
    offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * p + 1)

    def crop(image, offset):
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

    images = jax.vmap(crop)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
    images = jnp.where(mirror, images[:, :, ::-1, :], images)
  return images


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """uint8 pixels -> float32 (x / 255 - mean) / std, per channel."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def train_batch(images: jax.Array, labels: jax.Array, indices: jax.Array, rng: jax.Array,
                spec: DataSpec) -> dict[str, jax.Array]:
  """One augmented, normalised training batch: {'image': float32 NHWC, 'label': int32 (B,)}.

  `images` / `labels` are the on-device uint8 / int32 training arrays, `indices` one
  row of `epoch_permutation`, `rng` a fresh key per step, `spec` = `Dataset.spec` (static).
  """
  batch = augment(jnp.take(images, indices, axis=0), rng, spec.crop_padding, spec.flip,
                  spec.pad_mode)
  return {'image': normalize(batch, spec.mean, spec.std),
          'label': jnp.take(labels, indices, axis=0).astype(jnp.int32)}


def eval_indices(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Fixed-order evaluation plan: (indices, valid), both (ceil(n / batch_size), batch_size).

  Every example 0..n-1 appears exactly once with valid=True; the last batch is padded
  with index 0 and valid=False so that every batch has the same shape (one compile).
  """
  batch_size = _positive_int('batch_size', batch_size)
  steps = -(-n // batch_size)
  flat = np.arange(steps * batch_size)
  valid = flat < n
  return (np.where(valid, flat, 0).astype(np.int32).reshape(steps, batch_size),
          valid.reshape(steps, batch_size))


def eval_batch(images: jax.Array, labels: jax.Array, indices: jax.Array, valid: jax.Array,
               spec: DataSpec) -> dict[str, jax.Array]:
  """One normalised, unaugmented batch: {'image': float32, 'label': int32, 'valid': bool}.

  Padded entries (valid=False) hold a real image and its label; weight every per-example
  metric by `valid` and divide by the number of test examples.
  """
  return {'image': normalize(jnp.take(images, indices, axis=0), spec.mean, spec.std),
          'label': jnp.take(labels, indices, axis=0).astype(jnp.int32),
          'valid': jnp.asarray(valid, jnp.bool_)}


_eval_batch_jit = jax.jit(eval_batch, static_argnames='spec')


def eval_batches(images: jax.Array, labels: jax.Array, batch_size: int,
                 spec: DataSpec) -> Iterator[dict[str, jax.Array]]:
  """The test set in order, as `eval_batch` dicts of `batch_size` (the last one padded).

  For a host loop; inside jit use `eval_indices` and `eval_batch` (e.g. under lax.scan).
  """
  indices, valid = eval_indices(int(labels.shape[0]), batch_size)
  for idx, ok in zip(indices, valid):
    yield _eval_batch_jit(images, labels, idx, ok, spec)
