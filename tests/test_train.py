"""Training: it learns, masked channels stay frozen, no recompiles, the optimizer, 8 devices."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxprune import data, models, structure, train
from jaxprune.errors import ConfigError

IMAGE = (8, 8, 3)
CLASSES = 4


def learnable_dataset(n_train=256, n_test=64, seed=0) -> data.Dataset:
  """Random 8x8 images whose class sets the mean colour: learnable in a few steps."""
  rng = np.random.default_rng(seed)
  colours = rng.integers(0, 160, (CLASSES, 3))

  def split(n):
    labels = rng.integers(0, CLASSES, n).astype(np.int32)
    noise = rng.integers(0, 96, (n,) + IMAGE)
    return (colours[labels][:, None, None, :] + noise).astype(np.uint8), labels

  train_images, train_labels = split(n_train)
  test_images, test_labels = split(n_test)
  mean, std = data.channel_stats(train_images)
  return data.Dataset(name='learnable', train_images=train_images, train_labels=train_labels,
                      test_images=test_images, test_labels=test_labels, num_classes=CLASSES,
                      mean=mean, std=std, crop_padding=1, flip=True)


def numpy_variables(model, image_shape=IMAGE, seed=0) -> dict:
  """He-normal kernels, unit BN, zero biases, drawn with numpy.

  Jitting `model.init` compiles JAX's normal sampler, which costs seconds on a
  loaded CPU; tests (and their subprocesses) only need some fixed initial point.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + tuple(image_shape)))
  rng = np.random.default_rng(seed)
  flat = {}
  for key, leaf in traverse_util.flatten_dict(shapes).items():
    if key[-1] == 'kernel':
      value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    elif key[-1] in ('scale', 'var'):
      value = np.ones(leaf.shape)
    else:
      value = np.zeros(leaf.shape)
    flat[key] = jnp.asarray(value, leaf.dtype)
  return traverse_util.unflatten_dict(flat)


def python_process(code: str, *args: str, devices: int = 1) -> subprocess.Popen:
  """Starts `code` in a fresh Python with `devices` CPU devices and tests/ importable."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join([os.path.dirname(__file__), env.get('PYTHONPATH', '')])
  return subprocess.Popen([sys.executable, '-c', textwrap.dedent(code), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_python(code: str, *args: str, devices: int = 1, timeout: float = 180):
  """Runs `code` (see `python_process`) to the end: (returncode, stdout, stderr)."""
  proc = python_process(code, *args, devices=devices)
  stdout, stderr = proc.communicate(timeout=timeout)
  return proc.returncode, stdout, stderr


@functools.cache
def tiny():
  model = models.build('tiny', num_classes=CLASSES)
  return model, structure.derive(model, IMAGE), numpy_variables(model)


@functools.cache
def fixed_batch():
  ds = learnable_dataset()
  images = data.normalize(ds.train_images[:64], ds.mean, ds.std)
  return {'image': images, 'label': jnp.asarray(ds.train_labels[:64])}


def sgd(epochs=1, steps_per_epoch=10, **overrides):
  return train.make_optimizer(train.OptimizerConfig(**overrides), epochs, steps_per_epoch)


def prune_masks(struct, seed):
  rng = np.random.default_rng(seed)
  masks = {}
  for group in struct.prunable:
    keep = rng.random(struct.widths[group]) < 0.5
    keep[0], keep[-1] = True, False
    masks[group] = jnp.asarray(keep, jnp.float32)
  return masks


def test_train_steps_reduce_loss():
  model, struct, variables = tiny()
  trainer = train.Trainer(model, sgd(learning_rate=0.05, schedule='constant'), struct)
  state = trainer.init_state(variables, seed=0)
  batch = trainer.shard_batch(fixed_batch())
  losses = []
  for _ in range(8):
    state, metrics = trainer.train_step(state, batch, None)
    losses.append(metrics['loss'])
  losses = [float(l) for l in jax.device_get(losses)]
  assert losses[-1] < 0.6 * losses[0], losses


def test_masked_channels_parameters_and_momentum_stay_fixed():
  model, struct, variables = tiny()
  # Strong decay, BN-L1 and momentum all try to move the removed channels' parameters.
  trainer = train.Trainer(model, sgd(learning_rate=0.1, schedule='constant', weight_decay=0.05,
                                     bn_l1=0.01), struct)
  state = trainer.init_state(variables, seed=0)
  batch = trainer.shard_batch(fixed_batch())
  ones = {g: jnp.ones(struct.widths[g]) for g in struct.prunable}
  for _ in range(2):  # Momentum builds up before the channels are removed.
    state, _ = trainer.train_step(state, batch, ones)
  masks = prune_masks(struct, seed=1)
  before = traverse_util.flatten_dict(jax.device_get(state.variables))
  for _ in range(3):
    state, _ = trainer.train_step(state, batch, masks)
  after = traverse_util.flatten_dict(jax.device_get(state.variables))
  trace = traverse_util.flatten_dict(jax.device_get(
      {'params': state.opt_state[-1][0].trace}))
  checked = 0
  for group, mask in masks.items():
    removed = np.flatnonzero(np.asarray(mask) == 0)
    kept = np.flatnonzero(np.asarray(mask))
    for key, axis in struct.leaves_of(group):
      np.testing.assert_array_equal(np.take(after[key], removed, axis),
                                    np.take(before[key], removed, axis), err_msg=str(key))
      if key[0] == 'params':
        np.testing.assert_array_equal(np.take(trace[key], removed, axis), 0, err_msg=str(key))
        assert not np.array_equal(np.take(after[key], kept, axis), np.take(before[key], kept, axis))
        checked += 1
  assert checked >= 6


def test_train_step_compiles_once_for_any_mask_values():
  model, struct, variables = tiny()
  trainer = train.Trainer(model, sgd(), struct)
  state = trainer.init_state(variables, seed=0)
  batch = trainer.shard_batch(fixed_batch())
  for seed in range(3):
    state, _ = trainer.train_step(state, batch, prune_masks(struct, seed))
  jax.block_until_ready(state)
  assert trainer.train_step._cache_size() == 1


def test_bn_l1_adds_s_sign_gamma_to_bn_scales_only():
  _, _, variables = tiny()
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype),
                        variables['params'])
  tx = train.add_bn_scale_l1(0.5)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  flat_updates = traverse_util.flatten_dict(updates)
  bn_modules = {key[:-1] for key in traverse_util.flatten_dict(variables['batch_stats'])}
  scales = 0
  for key, p in traverse_util.flatten_dict(params).items():
    if key[:-1] in bn_modules and key[-1] == 'scale':
      np.testing.assert_array_equal(flat_updates[key], 0.5 * np.sign(p))
      scales += 1
    else:
      np.testing.assert_array_equal(flat_updates[key], 0, err_msg=str(key))
  assert scales == len(bn_modules) == 2


def test_optimizer_adds_coupled_decay_before_momentum():
  params = {'w': jnp.array([2.0, -1.0])}
  tx = sgd(learning_rate=0.5, schedule='constant', weight_decay=0.1, momentum=0.9)
  state = tx.init(params)
  grads = {'w': jnp.array([1.0, 1.0])}
  first, state = tx.update(grads, state, params)
  second, _ = tx.update(grads, state, params)
  effective = np.array([1.2, 0.9])  # grad + 0.1 * param
  np.testing.assert_allclose(first['w'], -0.5 * effective, rtol=1e-6)
  np.testing.assert_allclose(second['w'], -0.5 * 1.9 * effective, rtol=1e-6)


@pytest.mark.parametrize('config, epochs, expected', [
    # [R]: x0.1 at 50% and 75% of the epochs.
    (dict(), 10, {0: 0.1, 24: 0.1, 25: 0.01, 34: 0.01, 35: 0.001, 49: 0.001}),
    # int(fraction * epochs): 170 epochs decay at 85 and 127.
    (dict(), 170, {424: 0.1, 425: 0.01, 634: 0.01, 635: 0.001}),
    # WRN from scratch: x0.2 at epochs 60, 120, 160.
    (dict(decay_epochs=(60, 120, 160), decay_factor=0.2), 200,
     {299: 0.1, 300: 0.02, 599: 0.02, 600: 0.004, 800: 0.0008}),
    (dict(schedule='cosine'), 10, {0: 0.1, 25: 0.05, 50: 0.0}),
    (dict(schedule='constant', learning_rate=0.001), 40, {0: 0.001, 199: 0.001}),
])
def test_learning_rate_schedule_at_boundaries(config, epochs, expected):
  schedule = train.learning_rate_schedule(train.OptimizerConfig(**config), epochs, 5)
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-5, atol=1e-9, err_msg=str(step))


@pytest.mark.parametrize('config', [dict(schedule='linear'), dict(decay_fractions=(0.5, 1.5)),
                                    dict(decay_epochs=(10, 300))])
def test_bad_schedule_is_a_config_error(config):
  with pytest.raises(ConfigError):
    train.learning_rate_schedule(train.OptimizerConfig(**config), 200, 5)


def test_global_batch_on_one_process_is_the_local_batch():
  mesh = train.make_mesh()
  local = {'label': np.arange(8, dtype=np.int32)}
  assert train.host_batch_slice(8) == slice(0, 8)
  np.testing.assert_array_equal(train.global_batch(local, mesh)['label'], local['label'])


EIGHT_DEVICES = """
import json, sys, tempfile
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from flax import traverse_util
from jaxprune import data, train
from test_train import learnable_dataset, prune_masks, tiny

assert jax.device_count() == 8, jax.devices()
ds = learnable_dataset()
model, struct, variables = tiny()
optimizer = train.OptimizerConfig(learning_rate=0.05, weight_decay=1e-3, bn_l1=1e-3)
out = {}
for n in (1, 8):
  mesh = train.make_mesh(jax.devices()[:n])
  arrays = data.device_put_dataset(ds, NamedSharding(mesh, PartitionSpec()))
  final, result = train.fit(model, variables, arrays, ds.spec, epochs=1, batch_size=64,
                            optimizer=optimizer, stage_dir=tempfile.mkdtemp(), seed=3, mesh=mesh,
                            masks=prune_masks(struct, 0), structure=struct)
  leaves = traverse_util.flatten_dict(jax.device_get(final))
  out[n] = {'result': result, 'leaves': {'/'.join(k): np.asarray(v).ravel().tolist()
                                         for k, v in leaves.items()}}
print('RESULT' + json.dumps(out))
"""


def test_eight_devices_train_like_one():
  returncode, stdout, stderr = run_python(EIGHT_DEVICES, devices=8)
  assert returncode == 0, stderr[-3000:]
  out = json.loads(stdout.split('RESULT', 1)[1])
  one, eight = out['1'], out['8']
  for metric in ('train_loss', 'test_loss', 'train_accuracy', 'test_accuracy'):
    np.testing.assert_allclose(eight['result'][metric], one['result'][metric], rtol=1e-4,
                               atol=1e-5, err_msg=metric)
  assert eight['result']['steps'] == one['result']['steps'] == 4
  for key, value in one['leaves'].items():
    np.testing.assert_allclose(eight['leaves'][key], value, rtol=1e-4, atol=1e-5, err_msg=key)
