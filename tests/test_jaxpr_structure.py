"""Channel groups read off the traced program (jaxprune.prune.jaxpr), as a specification.

The built-in models' groups, scores and costs as the program gives them are checked
against a recorded reference in test_builtin_reference.py; here, what the program shows
of other constructions (heads, flattens, reductions, streams, unknown primitives).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import Pruner, models
from jaxprune.errors import ConfigError
from jaxprune.kernels.options import PerformanceOptions
from jaxprune.prune import program
from random_variables import random_like

IMAGE = (32, 32, 3)


def test_a_width_the_program_could_prune_stays_as_the_model_declares():
  # WRN-k-2's stem output is read only by its first block (BN, conv1 and a projection
  # shortcut), so the program alone would prune it; the model declares it not prunable.
  graph = program.derive(models.build('wrn16_2'), IMAGE).graph
  stem = graph.groups['stem']
  assert not stem.prunable and 'not one of the prunable groups of WideResNet' in stem.reason
  assert (('params', 'stem', 'kernel'), 3, 0) in stem.leaves
  # Native convolutions: the CPU rule reads a kernel element at run time, a cut to a program.
  model = models.build('wrn16_2', performance=PerformanceOptions(conv_impl='native'))
  unnamed = program.from_function(_Eval(model), _zeros_like_init(model),
                                  np.zeros((2,) + IMAGE, np.float32))
  assert unnamed.graph.groups['stem'].prunable


@dataclasses.dataclass(frozen=True)
class _Eval:
  model: nn.Module

  def apply(self, variables, x, train=False):
    return self.model.apply(variables, x, train=False)


def _zeros_like_init(model):
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1,) + IMAGE))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


class _Heads(nn.Module):
  """Self-attention over the pixels: Dense -> (heads, head_dim) -> attention -> Dense."""

  @nn.compact
  def __call__(self, x):
    b, h, w, _ = x.shape
    x = nn.Conv(16, (3, 3))(x).reshape(b, h * w, 16)
    q, k, v = (nn.Dense(16)(x).reshape(b, h * w, 4, 4) for _ in range(3))
    attention = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k), axis=-1)
    y = jnp.einsum('bhqk,bkhd->bqhd', attention, v).reshape(b, h * w, 16)
    return nn.Dense(10)(jnp.mean(nn.Dense(16)(y), axis=1))


def _linen(module, shape=(2, 8, 8, 3), **kwargs):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  variables = random_like(jax.eval_shape(module.init, jax.random.key(0), x))
  return Pruner(module.apply, variables, x, **kwargs), x


def test_heads_split_is_head_dim_granular():
  pruner, x = _linen(_Heads())
  query = next(g for g in pruner.groups.values() if g.name == 'Dense_0')
  assert query.prunable and query.width == 4
  assert [o for key, _, o in query.leaves if key == ('params', 'Dense_0', 'kernel')] == [0, 4, 8, 12]
  # The same slots of the keys: q and k are contracted over head_dim.
  assert [o for key, _, o in query.leaves if key == ('params', 'Dense_1', 'kernel')] == [0, 4, 8, 12]
  masks = {g: np.eye(w, dtype=np.float32)[0] + (np.arange(w) % 2)
           for g, w in pruner.structure.widths.items()}
  small = pruner.shrink(masks)
  np.testing.assert_allclose(small.apply(small.variables, x), pruner.apply(pruner.variables, x, masks),
                             rtol=1e-5, atol=1e-6)


class _Flatten(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), strides=2)(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_flatten_keeps_the_conv_channels_prunable():
  pruner, x = _linen(_Flatten())
  conv = pruner.groups['Conv_0']
  dense_offsets = [o for key, axis, o in conv.leaves if key == ('params', 'Dense_0', 'kernel')]
  assert conv.prunable and dense_offsets == list(range(0, 16 * 6, 6))
  masks = {'Conv_0': np.array([1, 0, 1, 0, 0, 1], np.float32)}
  small = pruner.shrink(masks)
  assert small.variables['params']['Dense_0']['kernel'].shape == (16 * 3, 10)
  np.testing.assert_allclose(small.apply(small.variables, x), pruner.apply(pruner.variables, x, masks),
                             rtol=1e-5, atol=1e-6)


class _ChannelLayerNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.Conv(8, (3, 3))(x))
    return nn.Dense(10)(jnp.mean(nn.relu(nn.Conv(8, (3, 3))(x)), axis=(1, 2)))


def test_a_reduction_over_channels_makes_them_unprunable():
  pruner, _ = _linen(_ChannelLayerNorm())
  assert not pruner.groups['Conv_0'].prunable
  assert 'reduced over' in pruner.groups['Conv_0'].reason
  assert pruner.groups['Conv_1'].prunable


class _Residual(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3))(x)
    x = x + nn.Conv(8, (3, 3))(nn.relu(nn.Conv(4, (3, 3))(x)))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def test_streams_prune_only_when_asked():
  pruner, _ = _linen(_Residual())
  # Conv_1 adds into Conv_0's channels; Conv_2 is the block's inner conv.
  assert 'stream' in pruner.groups['Conv_0'].reason and pruner.groups['Conv_2'].prunable
  streams, x = _linen(_Residual(), prune_streams=True)
  assert streams.groups['Conv_0'].prunable
  masks = {g: (np.arange(w) % 3 != 1).astype(np.float32) for g, w in streams.structure.widths.items()}
  small = streams.shrink(masks)
  np.testing.assert_allclose(small.apply(small.variables, x), streams.apply(streams.variables, x, masks),
                             rtol=1e-5, atol=1e-6)


class _Sorted(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.sort(nn.Conv(8, (3, 3))(x), axis=-1)
    return nn.Dense(10)(jnp.mean(nn.Conv(8, (3, 3))(x), axis=(1, 2)))


def test_unsupported_primitive_is_one_sentence_naming_it_and_the_parameter():
  with pytest.raises(ConfigError) as error:
    _linen(_Sorted())
  message = str(error.value)
  assert 'primitive sort' in message and 'params/Conv_0/kernel' in message
  assert '\n' not in message and message.count('. ') == 0 and message.endswith('.')


class _DataDependent(nn.Module):
  select: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3))(x)
    if self.select:
      x = x[..., jnp.mean(x, axis=(0, 1, 2)) > 0]
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def test_data_dependent_shape_is_one_sentence():
  x = np.ones((2, 8, 8, 3), np.float32)
  variables = random_like(jax.eval_shape(_DataDependent(select=False).init, jax.random.key(0), x))
  with pytest.raises(ConfigError) as error:
    Pruner(_DataDependent().apply, variables, x)
  message = str(error.value)
  assert 'depend on the data' in message and 'test_jaxpr_structure.py' in message
  assert 'NonConcreteBooleanIndexError' in message and '\n' not in message
