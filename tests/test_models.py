"""The foundation contract: the program-derived structure, masks, shrinking and cost counting."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from jaxprune import models
from jaxprune.errors import ConfigError
from jaxprune.kernels.options import PerformanceOptions
from jaxprune.prune import flops, program, shrink
from jaxprune.train import step

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.bench.common import CompileLog  # noqa: E402

# One small member of every family runs in CI; the large ones run with -m slow.
FAST_MODELS = ['tiny', 'vgg11_mlp', 'resnet8', 'preresnet11', 'wrn10_1', 'densenet10']
SLOW_MODELS = [m for m in models.MODELS if m not in FAST_MODELS]
ALL_MODELS = FAST_MODELS + [pytest.param(m, marks=pytest.mark.slow) for m in SLOW_MODELS]


# The ImageNet models downsample 32x: a 32x32 image leaves them one position to pool.
IMAGENET_MODELS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'vgg11_bn', 'vgg16_bn',
                   'vgg11_bn_fcbn')


def image_size(name):
  if name in IMAGENET_MODELS:
    return 32
  return 16 if name.startswith('vgg') else 8


def perturbed_variables(model, x, seed=0):
  """Initial variables with BN statistics and biases moved off their trivial init values."""
  variables = models.init(model, jax.random.key(seed), x.shape[1:])
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(variables)
  for key, value in flat.items():
    if key[0] == 'batch_stats' and key[-1] == 'var':
      flat[key] = jnp.asarray(rng.uniform(0.5, 1.5, value.shape), value.dtype)
    elif key[0] in ('batch_stats', 'params') and key[-1] != 'kernel':
      # BN scales, biases and means; kernels keep their init scale so that activations
      # stay in range through 40+ layers.
      flat[key] = value + jnp.asarray(0.1 * rng.normal(size=value.shape), value.dtype)
  return traverse_util.unflatten_dict(flat)


def random_masks(struct, density, rng, single=False):
  masks = {}
  for group in struct.prunable:
    width = struct.widths[group]
    keep = np.zeros(width, bool) if single else rng.random(width) < density
    if not keep.any():
      keep[rng.integers(width)] = True
    masks[group] = jnp.asarray(keep, jnp.float32)
  return masks


def _library_error(match):
  """A wrong value from library code: a ValueError that is not a user's ConfigError."""
  return pytest.raises(ValueError, match=match)


@functools.cache
def setup(name):
  model = models.build(name)
  size = image_size(name)
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  return model, x, program.derive(model, x.shape[1:]), perturbed_variables(model, x)


def param_count(variables):
  return sum(leaf.size for leaf in jax.tree.leaves(variables['params']))


@pytest.mark.parametrize('name', ALL_MODELS)
def test_shrunk_model_matches_masked_model(name):
  model, x, prog, variables = setup(name)
  struct = prog.structure
  rng = np.random.default_rng(0)
  masked_apply = jax.jit(prog.apply)
  for density, single in ((0.3, False), (0.8, False), (0.0, True)):
    masks = random_masks(struct, density, rng, single)
    expected = masked_apply(variables, x, masks=masks)
    widths, small, _ = shrink.shrink(prog, variables, masks)
    got = jax.jit(models.build(name, widths=widths).apply)(small, x)
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)
    assert param_count(small) == flops.count(struct, widths).params
    # What training with masks runs: the model itself, its kernels masked where they read.
    masked = {**variables, 'params': step.masked_kernels(struct, masks, variables['params'])}
    np.testing.assert_allclose(jax.jit(model.apply)(masked, x), expected, rtol=0,
                               atol=1e-5 * scale)


@pytest.mark.parametrize('name', FAST_MODELS)
def test_shrinking_with_all_ones_masks_returns_identical_variables(name):
  _, _, prog, variables = setup(name)
  struct = prog.structure
  masks = {g: jnp.ones(struct.widths[g]) for g in struct.prunable}
  widths, same, kept = shrink.shrink(prog, variables, masks)
  assert widths == struct.widths
  chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), same, variables)
  assert all(jax.tree.leaves(chex_equal))
  assert all(np.array_equal(kept[g], np.arange(struct.widths[g])) for g in struct.prunable)


def test_shrink_compiles_nothing():
  _, _, prog, variables = setup('resnet8')
  masks = random_masks(prog.structure, 0.5, np.random.default_rng(1), False)
  with CompileLog() as compiles:
    shrink.shrink(prog, variables, masks)
  assert compiles.events == []


@pytest.mark.parametrize('name', ['resnet8', pytest.param('densenet10', marks=pytest.mark.slow)])
def test_init_is_one_program_per_model_and_matches_eager_init(name):
  # Widths no other test initialises, so that nothing is cached yet.
  widths = {g: max(1, w - 3) for g, w in models.build(name).default_widths().items()}
  eager = models.build(name, widths=widths).init(jax.random.key(5), jnp.zeros((1, 8, 8, 3)))
  with CompileLog() as compiles:
    for seed in (5, 6, 7):  # a fresh module each time, as each seed of a run builds one
      got = models.init(models.build(name, widths=widths), jax.random.key(seed), (8, 8, 3))
      if seed == 5:
        first = got
  # (compiler.compiler_options may compile its one-time probe of the options too.)
  names = [fun for fun, _ in compiles.events]
  assert [n for n in names if 'init' in n] == ['jit(init)']
  assert len([n for n in names if 'init' not in n]) <= 1
  assert jax.tree.structure(first) == jax.tree.structure(eager)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(eager)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  # Another seed, other weights.
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(first)))


def test_shrink_rejects_a_mask_that_empties_a_group():
  _, _, prog, variables = setup('tiny')
  with _library_error("'conv2' removes all 16 channels") as error:
    shrink.shrink(prog, variables, {'conv2': jnp.zeros(16)})
  assert not isinstance(error.value, ConfigError)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_gate_gradient_is_per_example_activation_times_gradient(name):
  with jax.enable_x64(True):
    _check_gate_gradient(name)


def _check_gate_gradient(name):
  # In float64: the check compares two summation orders through up to 164 layers of
  # randomly initialised (unnormalised) networks, where float32 rounding alone reaches
  # 1e-3 of the largest gradient.
  _, x, prog, variables = setup(name)
  struct = prog.structure
  variables = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a,
                           variables)
  x = x.astype(jnp.float64)
  labels = jnp.arange(x.shape[0]) % 10

  def summed_loss(gates):
    logits = prog.apply(variables, x, masks=gates)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

  gates = {g: jnp.ones((x.shape[0], struct.widths[g])) for g in struct.prunable}
  gate_grads = jax.jit(jax.grad(summed_loss))(gates)

  # Independently, one example at a time: dloss/dactivation through additive offsets
  # at the record points, contracted with the activation over space.
  _, state = jax.jit(lambda v, x: prog.apply(v, x, mutable=['intermediates']))(variables, x)
  activations = {g: state['intermediates'][g][0] for g in struct.prunable}

  def example_loss(offsets, example, label):
    logits = prog.apply(variables, example, offsets=offsets)
    return optax.softmax_cross_entropy_with_integer_labels(logits, label).sum()

  example_grad = jax.jit(jax.grad(example_loss))  # one program for every example
  for i in range(x.shape[0]):
    zeros = {g: jnp.zeros_like(a[i:i + 1]) for g, a in activations.items()}
    activation_grads = example_grad(zeros, x[i:i + 1], labels[i:i + 1])
    for g, a in activations.items():
      spatial = tuple(range(1, a.ndim - 1))
      expected = jnp.sum(a[i:i + 1] * activation_grads[g], axis=spatial)[0]
      tolerance = 1e-6 * float(jnp.max(jnp.abs(expected))) + 1e-12
      np.testing.assert_allclose(gate_grads[g][i], expected, rtol=0, atol=tolerance)


PUBLISHED = {  # model: (MACs, params) as published for CIFAR-10, None where not stated.
    'vgg16_mlp': (3.13e8, None),
    'resnet56': (1.25e8, 0.85e6),
    'resnet110': (2.53e8, 1.7e6),
    'wrn40_2': (None, 2.2e6),
    'densenet40': (None, 1.0e6),
    'preresnet164': (None, 1.7e6),
}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_default_widths_match_published_counts(name):
  struct = program.derive(models.build(name)).structure
  cost = flops.count(struct)
  macs, params = PUBLISHED[name]
  if name == 'vgg16_mlp':  # the published figure counts the convolutions only
    conv_macs = sum(n * np.prod(struct.shapes[k]) for k, n in struct.positions.items()
                    if len(struct.shapes[k]) == 4)
    assert abs(conv_macs - macs) / macs < 0.01
  elif macs is not None:
    assert abs(cost.macs - macs) / macs < 0.01
  if params is not None:
    # Published parameter counts are rounded to 0.1M (DenseNet-40 counts 1,059,298).
    assert abs(cost.params - params) < 0.06e6


@pytest.mark.parametrize('name, size', [('tiny', 32), ('resnet20', 96), ('wrn16_2', 96), ('vgg11', 256)])
def test_macs_agree_with_xla_cost_analysis(name, size):
  # XLA's HLO cost analysis counts 2 flops per multiply-accumulate, but only over the
  # taps that land inside the unpadded input, and adds elementwise work (BN, ReLU,
  # pooling). The images are large enough that padding and elementwise ops stay within 5%.
  model = models.build(name)
  x = jnp.zeros((1, size, size, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  xla_flops = jax.jit(model.apply).lower(variables, x).cost_analysis()['flops']
  macs = flops.count(program.derive(model, x.shape[1:]).structure).macs
  assert abs(xla_flops / 2 - macs) / macs < 0.05


def test_unknown_model_name_is_one_sentence_naming_it():
  with pytest.raises(ConfigError, match=r"unknown model 'resnet57'; choose one of: .*resnet56"):
    models.build('resnet57')


def test_widths_with_missing_or_extra_groups_are_refused_by_name():
  widths = models.build('tiny').default_widths()
  x = jnp.zeros((1, 8, 8, 3))
  missing = {k: v for k, v in widths.items() if k != 'fc'}
  cases = [(missing, r"missing groups \['fc'\]"),
           ({**widths, 'conv3': 4}, r"unknown groups \['conv3'\]"),
           ({**widths, 'fc': 0}, r"must be positive integers, got \{'fc': 0\}")]
  for given, match in cases:
    with _library_error(match) as error:
      jax.eval_shape(models.build('tiny', widths=given).init, jax.random.key(0), x)
    assert not isinstance(error.value, ConfigError)


def test_a_resnet_stage_narrower_than_the_one_before_is_a_library_error():
  widths = {**models.build('resnet8').default_widths(), 'stage2': 8}
  with _library_error(r"stage2 width 8 is narrower than the stage before it \(16\)") as error:
    jax.eval_shape(models.build('resnet8', widths=widths).init, jax.random.key(0),
                   jnp.zeros((1, 8, 8, 3)))
  assert not isinstance(error.value, ConfigError)


def test_images_too_small_for_the_model_are_a_config_error():
  # The images are the user's (dataset, image size), so this one is theirs to fix.
  with pytest.raises(ConfigError, match=r"needs images of at least 16x16 pixels, got 8x8"):
    jax.eval_shape(models.build('vgg11').init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_masks_with_wrong_shape_or_group_are_refused_by_name():
  _, _, prog, variables = setup('tiny')
  struct = prog.structure
  shape = r"group 'conv1' has shape \(7,\); allowed: \(8,\) or \(2, 8\)"
  with _library_error(shape) as error:
    shrink.check_masks(struct, {'conv1': jnp.ones(7)}, batch=2)
  assert not isinstance(error.value, ConfigError)
  with _library_error(r"unknown group 'conv9'"):
    shrink.check_masks(struct, {'conv9': jnp.ones(8)})
  with _library_error(r"mask for group 'fc' has shape \(3,\)"):
    shrink.shrink(prog, variables, {'fc': np.ones(3)})


def test_models_of_the_same_widths_and_options_are_equal_and_hash_alike():
  widths = models.build('resnet20').default_widths()
  model = models.build('resnet20', widths=widths)
  same = models.build('resnet20', widths=dict(reversed(list(widths.items()))),
                      performance=PerformanceOptions())
  assert model == same and hash(model) == hash(same)
  assert {model: 'compiled'}[same] == 'compiled'
  given = dict(widths)
  copied = models.build('resnet20', widths=given)
  given['stage1_block1'] = 1
  assert copied == model
  # Construction with a plain dict (as structure derivation clones) freezes it too.
  clone = model.clone(widths=dict(widths))
  assert clone == model and hash(clone) == hash(model)
  assert type(models.widths_of(model)) is dict and models.widths_of(model) == widths
  assert models.widths_of(models.build('resnet20')) == widths
  others = [models.build('resnet20', widths={**widths, 'stage1_block1': 3}),
            models.build('resnet20', widths=widths, performance=PerformanceOptions('native')),
            models.build('resnet20', widths=widths,
                         performance=PerformanceOptions(batch_norm='flax')),
            models.build('resnet20', widths=widths,
                         performance=PerformanceOptions(xla_options='xla'))]
  for other in others:
    assert other != model
  assert len({model, *others}) == 5


def test_build_uses_the_default_options_not_the_environment(monkeypatch):
  monkeypatch.setenv('JAXPRUNE_CONV_IMPL', 'patches')
  model = models.build('tiny')
  assert model.performance == PerformanceOptions()
  options = PerformanceOptions.from_env()
  assert models.build('tiny', performance=options).performance.conv_impl == 'patches'
  assert model.clone(widths=model.default_widths()).performance == PerformanceOptions()


def _bn_scales(model, x) -> list:
  params = models.init(model, jax.random.key(0), x.shape[1:])['params']
  return [v for k, v in traverse_util.flatten_dict(params).items() if k[-1] == 'scale']


@pytest.mark.parametrize('name', FAST_MODELS)
def test_every_batch_norm_scale_starts_at_bn_scale_init(name):
  _, x, _, _ = setup(name)
  for bn_scale_init, model in ((1.0, models.build(name)),
                               (0.5, models.build(name, bn_scale_init=0.5))):
    scales = _bn_scales(model, x)
    assert scales
    for scale in scales:
      np.testing.assert_array_equal(scale, np.full(scale.shape, bn_scale_init, np.float32))


def test_dense_init_normal_001_draws_every_dense_kernel_from_n_0_001_with_zero_bias():
  _, x, _, _ = setup('vgg11_mlp')
  params = models.init(models.build('vgg11_mlp', dense_init='normal_0.01'), jax.random.key(0),
                       x.shape[1:])['params']
  for layer in ('fc_dense', 'head'):
    kernel = np.asarray(params[layer]['kernel'])
    assert abs(kernel.std() - 0.01) < 0.001 and abs(kernel.mean()) < 0.001, layer
    np.testing.assert_array_equal(params[layer]['bias'], 0)
  default = models.init(models.build('vgg11_mlp'), jax.random.key(0), x.shape[1:])['params']
  # Flax's default (LeCun) init: variance 1 / fan_in = 1 / 512.
  assert np.asarray(default['fc_dense']['kernel']).std() > 0.03


def test_avgpool_detached_shortcut_averages_pads_and_passes_no_gradient():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  detached = models.build('resnet8', resnet_shortcut='avgpool_detached')
  out = detached.downsampled(x, 2, 32)
  expected = x.reshape(2, 4, 2, 4, 2, 16).mean(axis=(2, 4))
  np.testing.assert_allclose(out[..., :16], expected, rtol=1e-6)
  np.testing.assert_array_equal(out[..., 16:], 0)
  assert not jnp.any(jax.grad(lambda x: detached.downsampled(x, 2, 32).sum())(x))
  default = models.build('resnet8')
  np.testing.assert_array_equal(default.downsampled(x, 2, 32)[..., :16], x[:, ::2, ::2, :])
  assert jnp.all(jax.grad(lambda x: default.downsampled(x, 2, 32).sum())(x)[:, ::2, ::2] == 1)
  # Identity blocks keep the identity shortcut either way.
  assert detached.downsampled(x, 1, 16) is x
  with pytest.raises(ConfigError, match='resnet_shortcut'):
    models.build('vgg11', resnet_shortcut='avgpool_detached')
