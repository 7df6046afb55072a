"""Training: it learns, masked channels stay frozen, no recompiles, the optimizer, evaluation,
errors, 8 devices."""

import dataclasses
import functools
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import count_compiles
from flax import traverse_util

from jaxprune import data, errors, models, train
from jaxprune.errors import ConfigError
from jaxprune.pipeline import stages as pipeline_stages
from jaxprune.prune import program
from jaxprune.train import checkpoint, loop
from jaxprune.train import step as step_lib

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


def run_python(code: str, *args: str, devices: int = 1, timeout: float = 600):
  """Runs `code` (see `python_process`) to the end: (returncode, stdout, stderr). The timeout
  only guards against a hang: on a loaded 2-core machine eight devices' programs take
  minutes to compile."""
  proc = python_process(code, *args, devices=devices)
  stdout, stderr = proc.communicate(timeout=timeout)
  return proc.returncode, stdout, stderr


@functools.cache
def tiny():
  model = models.build('tiny', num_classes=CLASSES)
  return model, program.derive(model, IMAGE).structure, numpy_variables(model)


@functools.cache
def fixed_batch():
  ds = learnable_dataset()
  images = data.normalize(ds.train_images[:64], ds.mean, ds.std)
  return {'image': images, 'label': jnp.asarray(ds.train_labels[:64])}


def sgd(**overrides):
  return train.make_optimizer(train.OptimizerConfig(**overrides))


def lr(value):
  # As fit passes it: a numpy float32 scalar, so every value runs the same compiled step.
  return np.float32(value)


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
  trainer = train.Trainer(model, sgd(), struct)
  state = trainer.init_state(variables, seed=0)
  batch = trainer.shard_batch(fixed_batch())
  losses = []
  for _ in range(8):
    state, metrics = trainer.train_step(state, batch, None, lr(0.05))
    losses.append(metrics['loss'])
  losses = [float(l) for l in jax.device_get(losses)]
  assert losses[-1] < 0.6 * losses[0], losses


def test_masked_channels_parameters_and_momentum_stay_fixed():
  model, struct, variables = tiny()
  # Strong decay, BN-L1 and momentum all try to move the removed channels' parameters.
  trainer = train.Trainer(model, sgd(weight_decay=0.05, bn_l1=0.01), struct)
  state = trainer.init_state(variables, seed=0)
  batch = trainer.shard_batch(fixed_batch())
  ones = {g: jnp.ones(struct.widths[g]) for g in struct.prunable}
  for _ in range(2):  # Momentum builds up before the channels are removed.
    state, _ = trainer.train_step(state, batch, ones, lr(0.1))
  masks = prune_masks(struct, seed=1)
  before = traverse_util.flatten_dict(jax.device_get(state.variables))
  for _ in range(3):
    state, _ = trainer.train_step(state, batch, masks, lr(0.1))
  after = traverse_util.flatten_dict(jax.device_get(state.variables))
  trace = traverse_util.flatten_dict(jax.device_get(
      {'params': state.opt_state[-1].trace}))
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


def test_train_step_compiles_once_for_any_mask_values(caplog):
  model, struct, variables = tiny()
  trainer = train.Trainer(model, sgd(), struct)
  state = trainer.init_state(variables, seed=0)
  batch = trainer.shard_batch(fixed_batch())

  def steps(state):
    for seed in range(3):
      state, _ = trainer.train_step(state, batch, prune_masks(struct, seed), lr(0.1 / (seed + 1)))
    return jax.block_until_ready(state)

  _, compiles = count_compiles(caplog, lambda: steps(state), 'sharded_train_step')
  assert compiles == 1


def test_fits_with_other_schedules_and_lengths_share_one_compiled_step(tmp_path, caplog):
  ds = learnable_dataset()
  arrays = data.device_put_dataset(ds)
  # Widths no other test trains, so that no earlier test has compiled this step.
  model = models.build('tiny', num_classes=CLASSES, widths={'conv1': 5, 'conv2': 7, 'fc': 9})
  variables = numpy_variables(model)
  scratch = train.OptimizerConfig(learning_rate=0.1, schedule='step')
  finetune = train.OptimizerConfig(learning_rate=0.01, schedule='constant')

  def both():
    train.fit(model, variables, arrays, ds.spec, train.TrainOptions(2, 64, scratch),
              stage_dir=tmp_path / 'scratch')
    return train.fit(model, variables, arrays, ds.spec, train.TrainOptions(1, 64, finetune),
                     stage_dir=tmp_path / 'finetune')

  (_, result), compiles = count_compiles(caplog, both, 'sharded_train_step')
  assert result['steps'] == 4
  assert compiles == 1
  assert (train.trainer_for(model, finetune, None, train.make_mesh())
          is train.trainer_for(model, scratch, None, train.make_mesh()))
  lines = (tmp_path / 'scratch' / 'metrics.jsonl').read_text().splitlines()
  # Two epochs put both milestones (50%, 75%) at epoch 1.
  assert [json.loads(l)['learning_rate'] for l in lines] == pytest.approx([0.1, 0.001])


def test_the_compiled_programs_of_models_no_longer_trained_are_let_go():
  mesh = train.make_mesh()
  optimizer = train.OptimizerConfig()

  def trainer(width):
    model = models.build('tiny', num_classes=CLASSES,
                         widths={'conv1': width, 'conv2': width, 'fc': width})
    return train.trainer_for(model, optimizer, None, mesh)

  first = trainer(3)
  assert trainer(3) is first
  kept = weakref.ref(first), weakref.ref(first.evaluator)
  del first
  for width in range(4, 4 + step_lib.PROGRAMS_KEPT):  # An experiment's many pruned networks.
    trainer(width)
  gc.collect()
  assert [ref() for ref in kept] == [None, None]


def test_train_step_is_sgd_with_momentum_and_the_schedule():
  """Against optax.sgd with the schedule inside the optimizer, across a learning-rate decay."""
  model, _, variables = tiny()
  config = train.OptimizerConfig(learning_rate=0.1, weight_decay=1e-3, momentum=0.9)
  epochs, steps_per_epoch = 4, 2  # x0.1 from step 4, x0.01 from step 6
  rates = train.learning_rates(config, epochs, steps_per_epoch)
  trainer = train.Trainer(model, train.make_optimizer(config))
  state = trainer.init_state(variables, seed=0)
  batch = fixed_batch()

  reference = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(
      train.learning_rate_schedule(config, epochs, steps_per_epoch), momentum=0.9))

  @jax.jit
  def reference_step(params, batch_stats, opt_state):
    def loss_fn(params):
      logits, new = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'],
                                train=True, mutable=['batch_stats'])
      return jnp.mean(train.cross_entropy(logits, batch['label'])), new['batch_stats']
    grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = reference.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = reference.init(params)
  for step in range(epochs * steps_per_epoch):
    state, _ = trainer.train_step(state, trainer.shard_batch(batch), None, rates[step])
    params, batch_stats, opt_state = reference_step(params, batch_stats, opt_state)
  np.testing.assert_allclose(rates[[3, 4, 5, 6]], [0.1, 0.01, 0.01, 0.001], rtol=1e-6)
  got, want = (traverse_util.flatten_dict(jax.device_get(p)) for p in (state.params, params))
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=str(key))
  momentum = traverse_util.flatten_dict(jax.device_get(state.opt_state[-1].trace))
  for key, buffer in traverse_util.flatten_dict(jax.device_get(opt_state[-1][0].trace)).items():
    np.testing.assert_allclose(momentum[key], buffer, rtol=1e-5, atol=1e-6, err_msg=str(key))


def test_bfloat16_step_keeps_parameters_optimizer_state_and_statistics_float32(caplog):
  model, struct, variables = tiny()
  trainer = train.Trainer(model, sgd(bn_l1=1e-3), struct, precision='bfloat16')
  state = trainer.init_state(variables, seed=0)

  def two_steps():
    first, metrics = trainer.train_step(state, trainer.shard_batch(fixed_batch()),
                                        prune_masks(struct, 0), lr(0.1))
    leaves = jax.tree.leaves((first.params, first.opt_state, first.batch_stats))
    assert leaves and {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float32)}
    assert metrics['loss'].dtype == jnp.float32
    return jax.block_until_ready(trainer.train_step(
        first, trainer.shard_batch(fixed_batch()), prune_masks(struct, 1), lr(0.1)))

  # The second step takes the first one's state as it is: same input types, one compile.
  _, compiles = count_compiles(caplog, two_steps, 'sharded_train_step')
  assert compiles == 1


def test_bfloat16_loss_is_close_to_the_float32_loss():
  model, struct, variables = tiny()
  losses = {}
  for precision in train.PRECISIONS:
    trainer = train.Trainer(model, sgd(), struct, precision=precision)
    state = trainer.init_state(variables, seed=0)
    batch = trainer.shard_batch(fixed_batch())
    evaluated = jax.device_get(trainer.eval_step(state.variables, batch, None))
    losses[precision + ' eval'] = float(evaluated['loss_sum'] / evaluated['count'])
    _, metrics = trainer.train_step(state, batch, None, lr(0.1))  # donates the state
    losses[precision] = float(metrics['loss'])
  # bfloat16 keeps 8 bits of mantissa; measured: 1.6430 (float32) vs 1.6436.
  assert losses['bfloat16'] == pytest.approx(losses['float32'], rel=0.02)
  assert losses['bfloat16 eval'] == pytest.approx(losses['float32 eval'], rel=0.02)


def test_bfloat16_fit_learns_digits(tmp_path):
  ds = data.load('digits')
  model = models.build('tiny', num_classes=ds.num_classes)
  options = train.TrainOptions(
      epochs=10, batch_size=64, precision='bfloat16',
      optimizer=train.OptimizerConfig(learning_rate=0.1, schedule='cosine'))
  _, result = train.fit(model, numpy_variables(model, ds.image_shape), data.device_put_dataset(ds),
                        ds.spec, options, stage_dir=tmp_path)
  # Chance is 0.1; measured 0.81 (float32: 0.80).
  assert result['test_accuracy'] > 0.5


def test_evaluate_variables_is_the_fits_evaluation_and_compiles_nothing_more(tmp_path, caplog):
  ds = learnable_dataset()
  arrays = data.device_put_dataset(ds)
  model, _, variables = tiny()
  options = train.TrainOptions(epochs=1, batch_size=64, eval_batch_size=48,
                               optimizer=train.OptimizerConfig(learning_rate=0.05))
  final, result = train.fit(model, variables, arrays, ds.spec, options, stage_dir=tmp_path)
  host_test_set = {'test_images': ds.test_images, 'test_labels': ds.test_labels}

  def evaluations():
    return [train.evaluate_variables(model, final, test_set, ds.spec, batch_size=48)
            for test_set in (arrays, host_test_set, host_test_set)]

  evaluated, compiles = count_compiles(caplog, evaluations, 'sharded_eval_step')
  assert compiles == 0
  for test in evaluated:
    assert test == {'loss': result['test_loss'], 'accuracy': result['test_accuracy']}
  # Saved variables (host arrays) evaluate as the trained ones.
  checkpoint.save_variables(tmp_path / 'saved', final)
  saved = checkpoint.load_variables(tmp_path / 'saved')
  assert train.evaluate_variables(model, saved, arrays, ds.spec, batch_size=48) == evaluated[0]


def test_evaluate_variables_honours_the_precision():
  ds = learnable_dataset()
  model, _, variables = tiny()
  tests = {precision: train.evaluate_variables(model, variables, data.device_put_dataset(ds),
                                               ds.spec, batch_size=64, precision=precision)
           for precision in train.PRECISIONS}
  assert tests['bfloat16'] != tests['float32']
  assert tests['bfloat16']['loss'] == pytest.approx(tests['float32']['loss'], rel=0.02)


@pytest.mark.parametrize('options, field', [
    (dict(epochs=0, batch_size=64), 'epochs'),
    (dict(epochs=1, batch_size=0), 'batch_size'),
    (dict(epochs=1, batch_size=64, eval_batch_size=0), 'eval_batch_size'),
])
def test_train_options_built_wrongly_by_code_are_value_errors(options, field):
  # The settings a user gives are refused by the config, before any TrainOptions is built.
  with pytest.raises(ValueError, match=f'TrainOptions.{field} must be at least 1') as error:
    train.TrainOptions(**options)
  assert not isinstance(error.value, ConfigError)


def test_a_two_dimensional_training_mask_is_a_value_error():
  model, struct, variables = tiny()
  masks = {g: jnp.ones((1, struct.widths[g])) for g in struct.prunable}
  with pytest.raises(ValueError, match=r'must have shape \(C,\)') as error:
    train.keep_multipliers(struct, masks, variables['params'], 'params')
  assert not isinstance(error.value, ConfigError)


def test_unknown_precision_is_a_config_error():
  model, struct, _ = tiny()
  with pytest.raises(ConfigError, match="unknown precision 'float16'"):
    train.Trainer(model, sgd(), struct, precision='float16')


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
  tx = sgd(weight_decay=0.1, momentum=0.9)
  state = tx.init(params)
  grads = {'w': jnp.array([1.0, 1.0])}
  first, state = tx.update(grads, state, params)
  second, _ = tx.update(grads, state, params)
  effective = np.array([1.2, 0.9])  # grad + 0.1 * param
  # The momentum buffer (buf = 0.9 * buf + g); train_step scales it by -learning_rate.
  np.testing.assert_allclose(first['w'], effective, rtol=1e-6)
  np.testing.assert_allclose(second['w'], 1.9 * effective, rtol=1e-6)


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
  rates = train.learning_rates(train.OptimizerConfig(**config), epochs, 5)
  assert rates.shape == (epochs * 5,) and rates.dtype == np.float32
  for step, value in expected.items():
    np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-5, atol=1e-9,
                               err_msg=str(step))
    if step < len(rates):
      np.testing.assert_allclose(rates[step], value, rtol=1e-5, atol=1e-9, err_msg=str(step))


@pytest.mark.parametrize('config, setting', [
    (dict(schedule='linear'), 'schedule'), (dict(decay_fractions=(0.5, 1.5)), 'decay_fractions'),
    (dict(decay_epochs=(10, 300)), 'decay_epochs')])
def test_bad_schedule_is_a_config_error(config, setting):
  with pytest.raises(ConfigError) as error:
    train.learning_rate_schedule(train.OptimizerConfig(**config), 200, 5)
  assert error.value.settings == (setting,) and '--' not in str(error.value)


EIGHT_DEVICES = """
import json, sys, tempfile
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from flax import traverse_util
from jaxprune import data, errors, train
from test_train import learnable_dataset, prune_masks, tiny, two_copies

assert jax.device_count() == 8, jax.devices()
ds = learnable_dataset()
model, struct, variables = tiny()
optimizer = train.OptimizerConfig(learning_rate=0.05, weight_decay=1e-3, bn_l1=1e-3)
out = {}
for n in (1, 8):
  mesh = train.make_mesh(jax.devices()[:n])
  arrays = data.device_put_dataset(ds, NamedSharding(mesh, PartitionSpec()))
  options = train.TrainOptions(epochs=1, batch_size=64, optimizer=optimizer)
  final, result = train.fit(model, variables, arrays, ds.spec, options,
                            stage_dir=tempfile.mkdtemp(), seed=3, mesh=mesh,
                            masks=prune_masks(struct, 0), structure=struct)
  leaves = traverse_util.flatten_dict(jax.device_get(final))
  out[n] = {'result': result, 'leaves': {'/'.join(k): np.asarray(v).ravel().tolist()
                                         for k, v in leaves.items()}}
  copies_model, inits, seeds = two_copies()
  copies = train.fit_copies(copies_model, inits, arrays, ds.spec, options,
                            stage_dirs=[tempfile.mkdtemp() for _ in seeds],
                            seeds=seeds, checkpoint_dir=tempfile.mkdtemp(), mesh=mesh)
  out[f'copies{n}'] = [r['test_loss'] for _, r in copies]
try:
  train.fit(model, variables, arrays, ds.spec, train.TrainOptions(epochs=1, batch_size=60),
            stage_dir=tempfile.mkdtemp(), mesh=mesh)
except errors.ConfigError as error:
  out['indivisible'] = {'message': str(error), 'settings': list(error.settings)}
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
  # Vmapped copies split each copy's batch over the devices the same way.
  np.testing.assert_allclose(out['copies8'], out['copies1'], rtol=1e-4, atol=1e-5)
  assert out['indivisible'] == {
      'message': 'batch_size 60 is not divisible by the 8 devices.', 'settings': ['batch_size']}


def assert_runs_agree(result, variables, expected, expected_variables, rtol, atol):
  """Two runs' final metrics and every variable agree within the tolerance."""
  for metric in ('train_loss', 'test_loss', 'train_accuracy', 'test_accuracy'):
    np.testing.assert_allclose(result[metric], expected[metric], rtol=rtol, atol=atol,
                               err_msg=metric)
  flat, flat_expected = (traverse_util.flatten_dict(jax.device_get(v))
                         for v in (variables, expected_variables))
  for key, value in flat_expected.items():
    np.testing.assert_allclose(flat[key], value, rtol=rtol, atol=atol, err_msg=str(key))


def two_copies():
  """The tiny model with two initial points and seeds, as two seeds' runs would start."""
  model, _, variables = tiny()
  return model, [variables, numpy_variables(model, seed=1)], [3, 4]


def test_fit_copies_equal_separate_fits(tmp_path):
  ds = learnable_dataset()
  arrays = data.device_put_dataset(ds)
  model, inits, seeds = two_copies()
  options = train.TrainOptions(
      epochs=2, batch_size=32,
      optimizer=train.OptimizerConfig(learning_rate=0.05, weight_decay=1e-3))
  stages = [tmp_path / 'copy0', tmp_path / 'copy1']
  record = {'performance': {'conv_impl': 'auto'}}
  together = pipeline_stages.train_stage_copies(model, inits, arrays, ds.spec, options,
                                                stage_dirs=stages, seeds=seeds,
                                                checkpoint_dir=tmp_path / 'group', record=record)
  for i, (init, seed) in enumerate(zip(inits, seeds)):
    alone_variables, alone = train.fit(model, init, arrays, ds.spec, options, seed=seed,
                                       stage_dir=tmp_path / f'alone{i}')
    variables, result = together[i]
    assert result['seed'] == seed and result['steps'] == alone['steps'] == 16
    assert_runs_agree(result, variables, alone, alone_variables, rtol=1e-4, atol=1e-5)
    records = [json.loads(line) for line in (stages[i] / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [1, 2]
    assert records[-1]['test_loss'] == result['test_loss']
  # Each copy trained its own run, not the same one twice.
  assert together[0][1]['train_loss'] != together[1][1]['train_loss']
  # A copy's stage is an ordinary finished stage, which is only read.
  assert checkpoint.read_result(stages[0]) == together[0][1] == {**record, **together[0][1]}
  _, loaded = pipeline_stages.train_stage(stages[0], model, inits[0], arrays, ds.spec, options,
                                          seed=seeds[0], record=record)
  assert loaded == together[0][1]
  assert not (stages[0] / checkpoint.CHECKPOINTS).exists()


def test_fit_copies_needs_one_variables_seed_and_stage_per_copy(tmp_path):
  ds = learnable_dataset()
  model, inits, seeds = two_copies()
  with pytest.raises(ValueError, match='one of each per copy'):
    train.fit_copies(model, inits, data.device_put_dataset(ds), ds.spec,
                     train.TrainOptions(epochs=1, batch_size=32), stage_dirs=[tmp_path / 'a'],
                     seeds=seeds, checkpoint_dir=tmp_path / 'group')


# ----------------------------------------------------------------------------- many steps per call

# 8 steps per epoch of the 256 training images: calls of 3, 3 and 2 steps.
CALLS = train.TrainOptions(epochs=2, batch_size=32, steps_per_call=3,
                           optimizer=train.OptimizerConfig(learning_rate=0.05, weight_decay=1e-3))


def fit_tiny(stage_dir, options=CALLS):
  ds = learnable_dataset()
  model, struct, variables = tiny()
  return train.fit(model, variables, data.device_put_dataset(ds), ds.spec, options,
                   stage_dir=stage_dir, seed=3, masks=prune_masks(struct, 0), structure=struct)


@pytest.fixture(scope='module')
def fitted_in_calls(tmp_path_factory):
  stage = tmp_path_factory.mktemp('calls')
  variables, result = fit_tiny(stage)
  return stage, jax.device_get(variables), result


def records_without_timing(stage):
  return [{k: v for k, v in r.items() if k not in ('elapsed_s', 'images_per_second')}
          for r in checkpoint.read_metrics(stage)]


def test_steps_in_one_call_equal_stepping_one_by_one(tmp_path, fitted_in_calls):
  # Not bit for bit: XLA compiles the loop body's convolutions and fusions otherwise than
  # a lone step's, which moves some values by an ulp per step; over 16 steps the runs
  # stay within float32 rounding of each other.
  stage, variables, result = fitted_in_calls
  alone_variables, alone = fit_tiny(tmp_path, dataclasses.replace(CALLS, steps_per_call=1))
  assert_runs_agree(result, variables, alone, alone_variables, rtol=1e-5, atol=1e-6)
  records, expected_records = records_without_timing(stage), records_without_timing(tmp_path)
  assert [(r['step'], r['learning_rate']) for r in records] == [
      (r['step'], r['learning_rate']) for r in expected_records]
  assert [r['step'] for r in records] == [8, 16]


def test_preempted_between_calls_saves_at_the_call_and_resumes_to_the_same_bits(
    tmp_path, fitted_in_calls, monkeypatch, caplog):
  """SIGTERM during epoch 2's first call (steps 8-10): saved at step 11, then resumed,
  every call of the resumed epoch has other bounds; the run is bit for bit the same."""
  expected_stage, expected_variables, expected = fitted_in_calls
  calls = []
  train_calls = loop.train_calls

  def signalling_calls(trainer, spec):
    program = train_calls(trainer, spec)

    def signal_in_fourth_call(*args):
      out = program(*args)
      calls.append(int(args[-1]))
      if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGTERM)
      return out
    return signal_in_fourth_call

  monkeypatch.setattr(loop, 'train_calls', signalling_calls)
  with pytest.raises(errors.Preempted) as preempted, checkpoint.SIGNALS.installed():
    fit_tiny(tmp_path)
  assert calls == [3, 6, 8, 11]
  assert preempted.value.step == 11 == checkpoint.RunCheckpoints(tmp_path).latest_step()
  monkeypatch.setattr(loop, 'train_calls', train_calls)
  resumed = functools.partial(fit_tiny, tmp_path, dataclasses.replace(CALLS, steps_per_call=4))
  (variables, result), compiles = count_compiles(caplog, resumed, 'sharded_train_steps')
  assert compiles == 0  # Calls of 4 steps (and a resumed epoch's 11..15) run the same program.
  assert {k: v for k, v in result.items() if k != 'wall_time_s'} == {
      k: v for k, v in expected.items() if k != 'wall_time_s'}
  flat, want = (traverse_util.flatten_dict(jax.device_get(v))
                for v in (variables, expected_variables))
  for key, value in want.items():
    np.testing.assert_array_equal(flat[key], value, err_msg=str(key))
  assert records_without_timing(tmp_path) == records_without_timing(expected_stage)


@pytest.mark.slow
def test_vmapped_copies_in_calls_equal_vmapped_copies_step_by_step(tmp_path):
  ds = learnable_dataset()
  arrays = data.device_put_dataset(ds)
  model, inits, seeds = two_copies()
  outs = [train.fit_copies(model, inits, arrays, ds.spec,
                           dataclasses.replace(CALLS, steps_per_call=per_call),
                           stage_dirs=[tmp_path / f'{per_call}a', tmp_path / f'{per_call}b'],
                           seeds=seeds, checkpoint_dir=tmp_path / f'group{per_call}')
          for per_call in (1, 3)]
  for (alone_variables, alone), (variables, result) in zip(*outs):
    for metric in ('train_loss', 'test_loss', 'train_accuracy', 'test_accuracy'):
      np.testing.assert_allclose(result[metric], alone[metric], rtol=1e-5, atol=1e-6)
    flat, expected = (traverse_util.flatten_dict(jax.device_get(v))
                      for v in (variables, alone_variables))
    for key, value in expected.items():
      np.testing.assert_allclose(flat[key], value, rtol=1e-5, atol=1e-6, err_msg=str(key))
