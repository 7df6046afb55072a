"""Tests for jaxprune.data: loading (npz, digits, TFDS mocked) and the on-device pipeline."""

import re
import socket
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import QUICK_FLAGS, ROOT, launch_command
from jaxprune import data, errors
from jaxprune.errors import ConfigError

SPEC = data.DataSpec(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_padding=2, flip=True)


def _one_sentence(message: str) -> bool:
  return '\n' not in message and message.endswith('.') and not re.search(r'\.\s+[A-Z]', message)


def _arrays(n_train=10, n_test=6, shape=(6, 6, 3), seed=0):
  rng = np.random.default_rng(seed)
  return {
      'train_images': rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
      'train_labels': rng.permutation(np.arange(n_train) % 4),  # every class in training
      'test_images': rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
      'test_labels': np.arange(n_test) % 4,
  }


def _write(tmp_path, arrays):
  path = tmp_path / 'ds.npz'
  np.savez(path, **arrays)
  return path


def _images(b=8, h=5, w=7, c=3):
  # Distinct values everywhere so a crop's offset and a flip are identifiable.
  return jnp.asarray(np.arange(b * h * w * c).reshape(b, h, w, c) % 251 + 1, jnp.uint8)


# --------------------------------------------------------------------------- loading


def test_npz_round_trip(tmp_path):
  arrays = _arrays()
  ds = data.load('npz', data_path=_write(tmp_path, arrays))
  np.testing.assert_array_equal(ds.train_images, arrays['train_images'])
  np.testing.assert_array_equal(ds.test_images, arrays['test_images'])
  np.testing.assert_array_equal(ds.train_labels, arrays['train_labels'])
  np.testing.assert_array_equal(ds.test_labels, arrays['test_labels'])
  assert ds.train_labels.dtype == np.int32 and ds.train_images.dtype == np.uint8
  assert ds.num_classes == 4 and ds.image_shape == (6, 6, 3)
  assert (ds.crop_padding, ds.flip) == (4, True)
  pixels = arrays['train_images'].reshape(-1, 3) / 255.0
  np.testing.assert_allclose(ds.mean, pixels.mean(0), rtol=1e-12)
  np.testing.assert_allclose(ds.std, pixels.std(0), rtol=1e-9)


def test_npz_max_train_keeps_a_fixed_random_subset(tmp_path):
  arrays = _arrays()
  path = _write(tmp_path, arrays)
  ds = data.load('npz', data_path=path, max_train=3)
  again = data.load('npz', data_path=path, max_train=3)
  np.testing.assert_array_equal(ds.train_images, again.train_images)
  rows = [np.flatnonzero((arrays['train_images'] == image).all(axis=(1, 2, 3)))
          for image in ds.train_images]
  assert all(len(r) >= 1 for r in rows) and ds.train_images.shape[0] == 3
  assert ds.num_test == 6


def test_max_train_on_class_sorted_data_still_sees_every_class():
  ds = data.load('digits')
  order = np.argsort(ds.train_labels, kind='stable')
  sorted_images, sorted_labels = ds.train_images[order], ds.train_labels[order]
  images, labels = data._subset(sorted_images, sorted_labels, 200)
  assert len(labels) == 200 and set(labels.tolist()) == set(range(10))


@pytest.mark.parametrize('change, words', [
    (lambda a: a.pop('test_labels'), ['test_labels']),
    (lambda a: a.update(train_images=a['train_images'][..., 0]), ['train_images', 'rank 3']),
    (lambda a: a.update(test_images=a['test_images'].astype(np.float32) / 255), ['test_images', 'float32']),
    (lambda a: a.update(test_images=a['test_images'][:, :0]), ['test_images', '(6, 0, 6, 3)']),
    (lambda a: a.update(train_labels=a['train_labels'][:-1]), ['train_labels', '9 labels']),
    (lambda a: a.update(train_labels=a['train_labels'][:, None]), ['train_labels', '(10, 1)']),
], ids=['missing_key', 'rank3', 'float_images', 'empty_height', 'mismatched_lengths',
        'rank2_labels'])
def test_bad_npz_is_one_sentence_config_error(tmp_path, change, words):
  arrays = _arrays()
  change(arrays)
  path = _write(tmp_path, arrays)
  with pytest.raises(ConfigError) as info:
    data.load('npz', data_path=path)
  message = str(info.value)
  assert _one_sentence(message), message
  assert str(path) in message
  for word in words:
    assert word in message, message


# How every refusal of a file's labels ends.
LABELS_ALLOWED = ('an npz file without num_classes must label its classes 0..K-1 with every '
                  'class in its training labels, or store num_classes (its labels then lie in '
                  '0..num_classes-1).')


def _ten_classes(**changes):
  """40 training examples of classes 0..9 (label i % 10 at index i) and one test example
  of each; `changes` replace training labels by index, or add entries."""
  arrays = _arrays(n_train=40, n_test=10)
  arrays['train_labels'] = np.arange(40) % 10
  arrays['test_labels'] = np.arange(10)
  for key, value in changes.items():
    if key.startswith('train_label_'):
      arrays['train_labels'][int(key.rsplit('_', 1)[1])] = value
    else:
      arrays[key] = value
  return arrays


def _refusal(tmp_path, arrays) -> tuple[str, str]:
  """(the ConfigError's message, the file's path as the message quotes it)."""
  path = _write(tmp_path, arrays)
  with pytest.raises(ConfigError) as info:
    data.load('npz', data_path=path)
  message = str(info.value)
  assert _one_sentence(message), message
  return message, repr(str(path))


def test_a_huge_label_is_one_sentence_at_once(tmp_path):
  message, path = _refusal(tmp_path, _ten_classes(train_label_7=10**9))
  assert message == (f'npz file {path}: the training labels 0..9, 1000000000 leave 999,999,990 '
                     'classes 10..999999999 without a training example (label 1000000000 is '
                     f'train_labels[7]); {LABELS_ALLOWED}')


def test_a_stray_255_among_ten_classes_is_refused_not_taken_for_256_classes(tmp_path):
  arrays = _ten_classes()
  arrays['train_labels'] = arrays['train_labels'].astype(np.uint8)
  arrays['train_labels'][23] = 255
  message, path = _refusal(tmp_path, arrays)
  assert message == (f'npz file {path}: the training labels 0..9, 255 leave 245 classes '
                     '10..254 without a training example (label 255 is train_labels[23]); '
                     f'{LABELS_ALLOWED}')


def test_a_negative_label_is_one_sentence(tmp_path):
  message, path = _refusal(tmp_path, _ten_classes(train_label_3=-1))
  assert message == (f'npz file {path}: train_labels[3] is -1, a negative label; '
                     f'{LABELS_ALLOWED}')
  arrays = _ten_classes()
  arrays['test_labels'][4] = -2
  message, path = _refusal(tmp_path, arrays)
  assert message.startswith(f'npz file {path}: test_labels[4] is -2, a negative label; ')


def test_a_non_integer_label_is_one_sentence(tmp_path):
  arrays = _ten_classes()
  arrays['train_labels'] = arrays['train_labels'] + np.where(np.arange(40) == 5, 0.5, 0.0)
  message, path = _refusal(tmp_path, arrays)
  assert message == (f'npz file {path}: train_labels has dtype float64 (train_labels[5] is '
                     '5.5) but must hold integer class indices.')
  arrays['train_labels'] = np.arange(40, dtype=np.float32) % 10
  message, path = _refusal(tmp_path, arrays)
  assert message == (f'npz file {path}: train_labels has dtype float32 but must hold integer '
                     'class indices; its values are whole numbers: store '
                     'train_labels.astype(np.int64).')


def test_a_class_missing_from_training_is_one_sentence(tmp_path):
  arrays = _ten_classes()
  arrays['train_labels'][arrays['train_labels'] == 3] = 4
  message, path = _refusal(tmp_path, arrays)
  assert message == (f'npz file {path}: the training labels 0..2, 4..9 leave class 3 without a '
                     f'training example (label 4 is train_labels[3]); {LABELS_ALLOWED}')
  # Labels counted from 1 leave class 0 out.
  arrays['train_labels'] = np.arange(40) % 10 + 1
  message, path = _refusal(tmp_path, arrays)
  assert message.startswith(f'npz file {path}: the training labels 1..10 leave class 0 without '
                            'a training example (label 1 is train_labels[0]); ')


def test_a_test_label_beyond_the_training_classes_is_one_sentence(tmp_path):
  arrays = _ten_classes()
  arrays['test_labels'][6] = 10
  message, path = _refusal(tmp_path, arrays)
  assert message == (f'npz file {path}: test_labels[6] is 10, beyond the training labels 0..9; '
                     f'{LABELS_ALLOWED}')


def test_num_classes_in_the_file_is_honoured(tmp_path):
  # Classes 3 and 10..11 without a training example, the test set with one of class 11.
  arrays = _ten_classes(num_classes=np.int64(12))
  arrays['train_labels'][arrays['train_labels'] == 3] = 4
  arrays['test_labels'][6] = 11
  ds = data.load('npz', data_path=_write(tmp_path, arrays))
  assert ds.num_classes == 12
  np.testing.assert_array_equal(ds.train_labels, arrays['train_labels'])
  np.testing.assert_array_equal(ds.test_labels, arrays['test_labels'])
  # A label it does not allow is still refused.
  message, path = _refusal(tmp_path, _ten_classes(num_classes=np.int64(10), train_label_7=255,
                                                  train_label_9=10))
  assert message == (f'npz file {path}: train_labels[7] is 255, but its num_classes=10 allows '
                     'only labels 0..9 (and 1 more label outside it).')
  message, path = _refusal(tmp_path, _ten_classes(num_classes=np.float32(10)))
  assert message.startswith(f'npz file {path}: num_classes must be a positive integer scalar')


def test_a_npy_array_under_an_npz_name_is_one_sentence(tmp_path):
  path = tmp_path / 'ds.npz'
  with open(path, 'wb') as f:
    np.save(f, _arrays()['train_images'])
  with pytest.raises(ConfigError) as info:
    data.load('npz', data_path=path)
  assert str(info.value) == (
      f'{str(path)!r} holds one array of shape (10, 6, 6, 3) (np.save writes one), not an npz '
      'archive of train_images, train_labels, test_images, test_labels (np.savez writes one).')


@pytest.mark.parametrize('keep', [0.5, 0.99, 0.0], ids=['half', 'last_bytes_cut', 'empty'])
def test_a_truncated_npz_is_one_sentence(tmp_path, keep):
  path = _write(tmp_path, _arrays())
  content = path.read_bytes()
  path.write_bytes(content[:int(len(content) * keep)])
  with pytest.raises(ConfigError) as info:
    data.load('npz', data_path=path)
  message = str(info.value)
  assert _one_sentence(message), message
  assert message.startswith(f'npz file {str(path)!r} is damaged (truncated or corrupted: ')
  assert message.endswith('); write it again.')


def test_a_text_file_under_an_npz_name_is_one_sentence(tmp_path):
  path = tmp_path / 'ds.npz'
  path.write_text('train_images,train_labels\n')
  with pytest.raises(ConfigError) as info:
    data.load('npz', data_path=path)
  assert str(info.value) == f'{str(path)!r} is not an npz archive (np.savez writes one).'


def test_launch_refuses_a_huge_label_in_one_line_before_writing_anything(tmp_path):
  path = _write(tmp_path, _ten_classes(train_label_7=10**9))
  workdir = tmp_path / 'work'
  run = subprocess.run(launch_command(*QUICK_FLAGS, '--dataset=npz', f'--data_path={path}',
                                      workdir=workdir),
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert run.returncode == 1, run.stderr[-3000:]
  assert 'Traceback' not in run.stderr
  assert run.stderr.strip().splitlines()[-1] == (
      f"error: npz file {str(path)!r}: the training labels 0..9, 1000000000 leave 999,999,990 "
      'classes 10..999999999 without a training example (label 1000000000 is train_labels[7]); '
      f'{LABELS_ALLOWED}')
  assert not workdir.exists()


def test_npz_without_data_path_or_with_a_missing_file_is_config_error(tmp_path):
  with pytest.raises(ConfigError) as info:
    data.load('npz')
  assert errors.as_flags(info.value) == '--dataset=npz needs --data_path=FILE.npz.'
  with pytest.raises(ConfigError, match='does not exist'):
    data.load('npz', data_path=tmp_path / 'nope.npz')


def test_unknown_dataset_and_unused_arguments_are_config_errors(tmp_path):
  with pytest.raises(ConfigError, match='cifar10, cifar100, digits, imagenet2012, npz'):
    data.load('mnist')
  with pytest.raises(ConfigError) as info:
    data.load('digits', data_dir=tmp_path)
  assert errors.as_flags(info.value).startswith('--data_dir is not used by --dataset=digits')
  with pytest.raises(ConfigError, match='max_train'):
    data.load('digits', max_train=0)


def test_digits_has_the_documented_split():
  ds = data.load('digits')
  assert ds.train_images.shape == (1437, 8, 8, 1) and ds.test_images.shape == (360, 8, 8, 1)
  assert ds.train_images.dtype == np.uint8 and ds.train_images.max() == 255
  assert ds.train_labels.dtype == np.int32 and set(ds.test_labels) == set(range(10))
  assert ds.num_classes == 10 and (ds.crop_padding, ds.flip) == (1, False)
  assert len(ds.mean) == len(ds.std) == 1 and 0 < ds.mean[0] < 1


class _Records:
  """A random-access source of CIFAR-like decoded records (what data_source yields)."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'id': f'train_{i}', 'image': np.full((32, 32, 3), i, np.uint8), 'label': np.int64(i % 10)}

  def __getitems__(self, keys):
    return [self[i] for i in keys]


def test_cifar10_through_mocked_tfds(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')

  # TFDS 4.9.10's default mock source breaks on __getitems__ (its partial lacks `self`),
  # so supply the records; data_source, the builder and the split handling stay real.
  def as_data_source(builder, split, **kwargs):
    del kwargs
    assert builder.name == 'cifar10'
    return [_Records({'train': 12, 'test': 5}[s]) for s in split]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    ds = data.load('cifar10', data_dir=tmp_path, max_train=8)
  assert ds.train_images.shape == (8, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (5, 32, 32, 3)
  assert ds.train_labels.dtype == np.int32
  kept = ds.train_images[:, 0, 0, 0]  # each mock image is filled with its record index
  assert len(set(kept.tolist())) == 8 and kept.max() < 12
  np.testing.assert_array_equal(ds.train_labels, kept % 10)
  assert ds.num_classes == 10 and ds.spec == data.DataSpec(ds.mean, ds.std, 4, True)


@pytest.fixture
def network_calls(monkeypatch):
  """Every attempt to resolve a name or open a connection, refused and recorded."""
  calls = []

  def refuse(what):
    def call(*args, **kwargs):
      calls.append((what, args))
      raise OSError(f'{what} is refused in this test')
    return call

  monkeypatch.setattr(socket, 'getaddrinfo', refuse('getaddrinfo'))
  monkeypatch.setattr(socket, 'create_connection', refuse('create_connection'))
  monkeypatch.setattr(socket.socket, 'connect', refuse('connect'))
  return calls


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_unprepared_cifar_says_how_to_prepare_it_without_touching_the_network(
    tmp_path, name, network_calls):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(ConfigError) as info:
    data.load(name, data_dir=tmp_path)
  message = errors.as_flags(info.value)
  assert _one_sentence(message), message
  assert message.startswith(f"{name} is not prepared in '{tmp_path}'; prepare it once with "
                            f'tfds build {name} --file_format=array_record '
                            f'--data_dir={tmp_path} '), message
  for word in ("pip install 'jaxprune[prepare]'", '--data_dir=DIR', '--dataset=npz',
               '--data_path', '--dataset=digits'):
    assert word in message, message
  assert network_calls == []


def test_prepared_but_unreadable_cifar_says_to_prepare_array_record(tmp_path, monkeypatch,
                                                                   network_calls):
  tfds = pytest.importorskip('tensorflow_datasets')

  def tfrecord_only(*args, **kwargs):
    raise NotImplementedError('Random access data source for file format tfrecord is not supported')

  monkeypatch.setattr(tfds, 'data_source', tfrecord_only)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  with pytest.raises(ConfigError) as info:
    data.load('cifar10', data_dir=tmp_path)
  message = str(info.value)
  assert _one_sentence(message), message
  assert '--file_format=array_record' in message and str(tmp_path) in message
  assert network_calls == []


# --------------------------------------------------------------------------- device side


def test_device_put_dataset_keeps_uint8_and_values(tmp_path):
  ds = data.load('npz', data_path=_write(tmp_path, _arrays()))
  on_device = data.device_put_dataset(ds)
  assert on_device['train_images'].dtype == jnp.uint8
  assert on_device['test_labels'].dtype == jnp.int32
  np.testing.assert_array_equal(on_device['train_images'], ds.train_images)
  np.testing.assert_array_equal(on_device['test_labels'], ds.test_labels)


def test_augment_without_padding_or_flip_is_identity():
  images = _images()
  out = data.augment(images, jax.random.key(0), crop_padding=0, flip=False)
  assert out.dtype == jnp.uint8
  np.testing.assert_array_equal(out, images)


def test_crops_are_shifts_of_the_zero_padded_image():
  images, p = _images(), 2
  out = np.asarray(jax.jit(data.augment, static_argnums=(2, 3))(images, jax.random.key(1), p, False))
  padded = np.pad(np.asarray(images), ((0, 0), (p, p), (p, p), (0, 0)))
  h, w = images.shape[1:3]
  offsets = set()
  for image, crop in zip(padded, out):
    found = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
             if np.array_equal(image[dy:dy + h, dx:dx + w], crop)]
    assert len(found) == 1
    offsets.add(found[0])
  assert len(offsets) > 1  # offsets differ between images


def test_flip_mirrors_some_images_left_right():
  images = _images(b=32)
  out = np.asarray(data.augment(images, jax.random.key(2), crop_padding=0, flip=True))
  mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, np.asarray(images))]
  same = [np.array_equal(o, i) for o, i in zip(out, np.asarray(images))]
  assert all(m != s for m, s in zip(mirrored, same))
  assert 0 < sum(mirrored) < len(mirrored)


def test_augment_is_deterministic_per_key():
  images = _images()
  a = data.augment(images, jax.random.key(3), 2, True)
  b = data.augment(images, jax.random.key(3), 2, True)
  c = data.augment(images, jax.random.key(4), 2, True)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_normalize_matches_numpy():
  images = _images()
  out = data.normalize(images, SPEC.mean, SPEC.std)
  expected = (np.asarray(images, np.float64) / 255 - np.array(SPEC.mean)) / np.array(SPEC.std)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_epoch_permutation_is_a_permutation_dropping_the_remainder():
  idx = np.asarray(jax.jit(data.epoch_permutation, static_argnums=(1, 2))(jax.random.key(5), 23, 4))
  assert idx.shape == (5, 4) and idx.dtype == np.int32
  assert len(set(idx.ravel())) == 20 and set(idx.ravel()) <= set(range(23))
  full = np.asarray(data.epoch_permutation(jax.random.key(5), 24, 4))
  np.testing.assert_array_equal(np.sort(full.ravel()), np.arange(24))
  with pytest.raises(ConfigError, match='batch_size'):
    data.epoch_permutation(jax.random.key(5), 3, 4)


def test_train_batch_gathers_augments_and_normalises():
  images, labels = _images(b=10), jnp.arange(10, dtype=jnp.int32) * 3
  indices = jnp.array([7, 2, 5], jnp.int32)
  fn = jax.jit(data.train_batch, static_argnames='spec')
  batch = fn(images, labels, indices, jax.random.key(6), SPEC)
  assert batch['image'].shape == (3, 5, 7, 3) and batch['image'].dtype == jnp.float32
  np.testing.assert_array_equal(batch['label'], [21, 6, 15])
  expected = data.normalize(data.augment(images[indices], jax.random.key(6), 2, True), SPEC.mean, SPEC.std)
  np.testing.assert_allclose(batch['image'], expected, rtol=1e-6, atol=1e-6)


def test_train_batch_pads_the_crop_as_its_spec_says():
  import dataclasses
  images, labels = _images(b=4), jnp.arange(4, dtype=jnp.int32)
  indices = jnp.arange(4, dtype=jnp.int32)
  batches = {mode: data.train_batch(images, labels, indices, jax.random.key(6),
                                    dataclasses.replace(SPEC, pad_mode=mode))['image']
             for mode in data.PAD_MODES}
  expected = data.normalize(data.augment(images, jax.random.key(6), 2, True, 'reflect'),
                            SPEC.mean, SPEC.std)
  np.testing.assert_allclose(batches['reflect'], expected, rtol=1e-6, atol=1e-6)
  assert not np.allclose(batches['reflect'], batches['zero'])


def test_eval_batches_count_every_test_example_once():
  n, batch_size = 11, 4
  images, labels = _images(b=n), jnp.arange(n, dtype=jnp.int32)
  batches = list(data.eval_batches(images, labels, batch_size, SPEC))
  assert len(batches) == 3 and all(b['image'].shape[0] == batch_size for b in batches)
  seen = np.concatenate([np.asarray(b['label'])[np.asarray(b['valid'])] for b in batches])
  np.testing.assert_array_equal(seen, np.arange(n))  # in order, each exactly once
  assert int(sum(b['valid'].sum() for b in batches)) == n
  np.testing.assert_allclose(batches[0]['image'], data.normalize(images[:4], SPEC.mean, SPEC.std),
                             rtol=1e-6, atol=1e-6)
