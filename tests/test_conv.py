"""The convolution module: both formulations agree, the auto rule, the model's choice,
nn.Conv's parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxprune import models
from jaxprune.prune import program
from jaxprune.errors import ConfigError
from jaxprune.kernels import conv
from jaxprune.kernels.options import PerformanceOptions
from jaxprune.models import layers

CASES = [(kernel, stride, size) for kernel in (1, 3) for stride in (1, 2) for size in (2, 5, 8)]


def _inputs(kernel, size, channels_in=5, channels_out=7, seed=0):
  kx, kk = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (3, size, size, channels_in))
  k = jax.random.normal(kk, (kernel, kernel, channels_in, channels_out)) / kernel
  return x, k


def _close(a, b):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max())))


def _apply(impl, kernel, stride, x, k):
  pads = conv._pads(x.shape[1:3], (kernel, kernel), (stride, stride), 'SAME')
  return conv.FORMULATIONS[impl](x, k, (stride, stride), pads)


def _jit_apply(impl, kernel, stride):
  # One compiled program per case keeps the test fast (eager mode compiles every op).
  return jax.jit(lambda x, k: _apply(impl, kernel, stride, x, k))


@pytest.mark.parametrize('kernel,stride,size', CASES)
def test_patches_forward_equals_native(kernel, stride, size):
  x, k = _inputs(kernel, size)
  native = _jit_apply('native', kernel, stride)(x, k)
  patches = _jit_apply('patches', kernel, stride)(x, k)
  assert patches.shape == native.shape
  _close(patches, native)


@pytest.mark.parametrize('kernel,stride,size', CASES)
def test_patches_gradients_equal_native(kernel, stride, size):
  x, k = _inputs(kernel, size)
  shape = jax.eval_shape(lambda x, k: _apply('native', kernel, stride, x, k), x, k).shape
  cotangent = jax.random.normal(jax.random.key(2), shape)

  def grads(impl):
    return jax.jit(jax.grad(lambda x, k: jnp.sum(_apply(impl, kernel, stride, x, k) * cotangent),
                            argnums=(0, 1)))(x, k)

  (dx_n, dk_n), (dx_p, dk_p) = grads('native'), grads('patches')
  _close(dx_p, dx_n)
  _close(dk_p, dk_n)


def test_module_formulations_agree_under_jit():
  x, _ = _inputs(3, 4, channels_in=6)
  variables = conv.Conv(8, (3, 3), strides=(2, 2), use_bias=True, impl='native').init(
      jax.random.key(0), x)
  outs = [jax.jit(conv.Conv(8, (3, 3), strides=(2, 2), use_bias=True, impl=impl).apply)(variables, x)
          for impl in ('native', 'patches')]
  _close(outs[1], outs[0])


def test_auto_rule_on_cpu_is_the_documented_one():
  assert conv.PATCHES_MAX_OUTPUT_PIXELS == 4  # 2x2 maps
  for shape in ((2, 2), (1, 1), (1, 4)):
    assert conv.choose_impl('auto', shape, 'cpu') == 'patches'
  for shape in ((1, 5), (4, 4), (8, 8), (32, 32), (7, 9)):
    assert conv.choose_impl('auto', shape, 'cpu') == 'native'


def test_auto_is_native_off_cpu():
  for backend in ('gpu', 'tpu', 'cuda', 'rocm'):
    for shape in ((2, 2), (32, 32)):
      assert conv.choose_impl('auto', shape, backend) == 'native'


def test_explicit_impl_overrides_the_rule():
  assert conv.choose_impl('native', (2, 2), 'cpu') == 'native'
  assert conv.choose_impl('patches', (32, 32), 'gpu') == 'patches'


def _uses_native_conv(module, x):
  variables = module.init(jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(module.apply)(variables, x)
  return 'conv_general_dilated' in str(jaxpr)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the auto rule differs off CPU')
def test_module_follows_the_auto_rule_on_cpu():
  # A stride-2 3x3 conv on 4x4 gives a 2x2 output (patches); on 8x8 a 4x4 one (native).
  module = conv.Conv(4, (3, 3), strides=(2, 2))
  assert not _uses_native_conv(module, jnp.ones((2, 4, 4, 3)))
  assert _uses_native_conv(module, jnp.ones((2, 8, 8, 3)))


def test_a_model_computes_its_convolutions_as_its_performance_options_say():
  x = jnp.ones((2, 8, 8, 3))  # 'auto' picks native for tiny's 8x8 and 4x4 maps
  assert _uses_native_conv(models.build('tiny'), x)
  assert not _uses_native_conv(
      models.build('tiny', performance=PerformanceOptions(conv_impl='patches')), x)
  layer = layers.conv(PerformanceOptions(conv_impl='patches'), 4, 3)
  assert layer.impl == 'patches'
  assert not _uses_native_conv(layer, x)


@pytest.mark.parametrize('spatial,kernel,stride,padding', [
    ((8, 8), (3, 3), (1, 1), 'SAME'), ((9, 7), (3, 3), (2, 2), 'SAME'),
    ((9, 7), (3, 3), (2, 2), 'VALID'), ((11, 10), (5, 3), (2, 1), 'SAME'),
    ((8, 8), (1, 1), (2, 2), 'SAME'), ((7, 7), (3, 3), (1, 1), ((2, 1), (0, 2))),
    ((3, 3), (3, 3), (2, 2), 'SAME')])
def test_canonical_layout_gradients_equal_lax_bit_for_bit(spatial, kernel, stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2,) + spatial + (5,)), jnp.float32)
  k = jnp.asarray(rng.normal(size=kernel + (5, 6)), jnp.float32)
  pads = conv._pads(spatial, kernel, stride, padding)
  cotangent = jnp.asarray(rng.normal(size=conv.conv_native(x, k, stride, pads).shape))
  vjps = [jax.vjp(lambda x, k, fn=fn: fn(x, k, stride, pads), x, k)[1]
          for fn in (conv.conv_native, conv.conv_canonical)]
  for jitted in (False, True):
    grads = [(jax.jit(vjp) if jitted else vjp)(cotangent) for vjp in vjps]
    for native, canonical in zip(*grads):
      np.testing.assert_array_equal(np.asarray(canonical), np.asarray(native))


def test_materialize_is_exactly_the_identity_with_identity_gradient():
  x, k = _inputs(3, 5)
  # (XLA's CPU backend flushes denormals in every op, the convolution included.)
  y = jax.jit(conv.materialize)(x, k)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  cotangent = jax.random.normal(jax.random.key(4), x.shape)
  dx, dk = jax.grad(lambda x, k: jnp.sum(conv.materialize(x, k) * cotangent), (0, 1))(x, k)
  np.testing.assert_array_equal(np.asarray(dx), np.asarray(cotangent))
  assert not np.asarray(dk).any()


def _divides(module, x):
  variables = module.init(jax.random.key(0), x)
  return ' div ' in str(jax.make_jaxpr(module.apply)(variables, x))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='materialize is for the CPU backend')
def test_only_auto_materializes_the_input_on_cpu():
  x = jnp.ones((2, 8, 8, 3))
  assert _divides(conv.Conv(4, (3, 3)), x)
  assert not _divides(conv.Conv(4, (3, 3), impl='native'), x)
  assert not _divides(conv.Conv(4, (3, 3), impl='patches'), x)


@pytest.mark.parametrize('size,channels', [(2, 6), (8, 6), (8, 64)])
def test_auto_module_equals_native_module(size, channels):
  x, _ = _inputs(3, size, channels_in=channels)
  variables = conv.Conv(8, (3, 3), impl='native').init(jax.random.key(0), x)
  grads = {}
  for impl in ('native', 'auto'):
    f = lambda v, x: jnp.sum(jnp.sin(conv.Conv(8, (3, 3), impl=impl).apply(v, x)))
    grads[impl] = jax.jit(jax.grad(f, (0, 1)))(variables, x)
  for a, b in zip(jax.tree.leaves(grads['auto']), jax.tree.leaves(grads['native'])):
    _close(a, b)


def test_an_unknown_impl_is_a_config_error_as_a_setting_and_a_bug_as_a_field():
  with pytest.raises(ConfigError, match=r"^unknown conv_impl 'fast'; choose one of: auto, native, "
                                        r"patches\.$") as error:
    PerformanceOptions(conv_impl='fast')
  assert error.value.settings == ('conv_impl',)
  with pytest.raises(ValueError, match='native') as error:
    conv.Conv(3, (3, 3), impl='fast').init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
  assert not isinstance(error.value, ConfigError)


@pytest.mark.parametrize('use_bias', [False, True])
@pytest.mark.parametrize('kernel,stride', [(1, 1), (3, 1), (3, 2)])
def test_parameters_identical_to_nn_conv(use_bias, kernel, stride):
  x = jnp.ones((2, 6, 6, 5))
  kwargs = dict(features=7, kernel_size=(kernel, kernel), strides=(stride, stride),
                padding='SAME', use_bias=use_bias, kernel_init=layers.conv_init)
  ours = conv.Conv(**kwargs).init(jax.random.key(3), x)
  theirs = nn.Conv(**kwargs).init(jax.random.key(3), x)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  # And with those parameters the two modules compute the same function.
  _close(conv.Conv(**kwargs).apply(theirs, x), nn.Conv(**kwargs).apply(theirs, x))


def test_layers_conv_is_an_nn_conv_with_unchanged_paths():
  module = layers.conv(PerformanceOptions(), 8, 3, 2, name='conv1_conv')
  assert isinstance(module, nn.Conv) and isinstance(module, conv.Conv)
  model = models.build('tiny')
  flat = traverse_util.flatten_dict(model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))['params'])
  assert ('conv1_conv', 'kernel') in flat and ('conv2_conv', 'kernel') in flat
  assert flat[('conv2_conv', 'kernel')].shape == (3, 3, 8, 16)
  # MAC counting finds every conv (it looks for nn.Conv instances).
  positions = program.derive(model, (8, 8, 3)).structure.positions
  assert positions[('params', 'conv1_conv', 'kernel')] == 64
  assert positions[('params', 'conv2_conv', 'kernel')] == 16


def test_an_unsupported_configuration_is_a_value_error():
  with pytest.raises(ValueError, match='feature_group_count') as error:
    conv.Conv(4, (3, 3), feature_group_count=2).init(jax.random.key(0), jnp.ones((1, 4, 4, 4)))
  assert not isinstance(error.value, ConfigError)
