"""Program constructs the jaxpr derivation reads (jaxprune.prune.jaxpr): splits, kernels
transformed before their convolution, checkpointed layers, a tiled class token and an
unused head. For each, the groups or the MACs are what the model computes, and the shrunk
program equals the masked one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import Pruner
from random_variables import random_like


def _linen(module, shape=(2, 8, 8, 3)):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  variables = random_like(jax.eval_shape(module.init, jax.random.key(0), x))
  return Pruner(module.apply, variables, x), x


def _assert_shrunk_equals_masked(pruner, x):
  masks = {g: (np.arange(w) % 3 != 1).astype(np.float32)
           for g, w in pruner.structure.widths.items()}
  small = pruner.shrink(masks)
  np.testing.assert_allclose(small.apply(small.variables, x),
                             pruner.apply(pruner.variables, x, masks), rtol=1e-5, atol=1e-6)


def _offsets(group, name):
  return [(axis, o) for key, axis, o in group.leaves if key == ('params', name, 'kernel')]


class _Split(nn.Module):
  @nn.compact
  def __call__(self, x):
    a, b = jnp.split(nn.Conv(8, (3, 3))(x), [3], axis=-1)
    y = jnp.concatenate([nn.Conv(4, (3, 3))(nn.relu(a)), nn.Conv(4, (1, 1))(nn.relu(b))], -1)
    return nn.Dense(10)(jnp.mean(y, axis=(1, 2)))


def test_a_split_ties_its_producer_piecewise_to_each_piece_reader():
  pruner, x = _linen(_Split())
  first, second = pruner.groups['Conv_0'], pruner.groups['Conv_0:1']
  assert first.prunable and first.width == 3 and second.prunable and second.width == 5
  assert _offsets(first, 'Conv_0') == [(3, 0)] and _offsets(first, 'Conv_1') == [(2, 0)]
  assert _offsets(second, 'Conv_0') == [(3, 3)] and _offsets(second, 'Conv_2') == [(2, 0)]
  _assert_shrunk_equals_masked(pruner, x)


class _StandardisedConv(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    shape = (3, 3, x.shape[-1], self.features)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), shape)
    mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    kernel = (kernel - mean) / jnp.std(kernel, axis=(0, 1, 2), keepdims=True)
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class _TransformedKernels(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(_StandardisedConv(8)(x))
    x = nn.relu(nn.ConvTranspose(6, (3, 3), transpose_kernel=True)(x))
    return nn.WeightNorm(nn.Dense(10))(jnp.mean(x, axis=(1, 2)))


def test_a_transformed_kernel_is_still_its_leaf_for_macs_and_names():
  pruner, x = _linen(_TransformedKernels())
  # Per-output-channel statistics: the standardised conv's channels stay prunable, named
  # after its own kernel.
  standardised = pruner.groups['_StandardisedConv_0']
  assert standardised.prunable and _offsets(standardised, '_StandardisedConv_0') == [(3, 0)]
  # The weight norm of the Dense reduces over its input channels: removing one changes it.
  assert 'reduced over' in pruner.groups['ConvTranspose_0'].reason
  assert pruner.cost().macs == 8 * 8 * (3 * 3 * 3 * 8) + 8 * 8 * (3 * 3 * 8 * 6) + 6 * 10
  _assert_shrunk_equals_masked(pruner, x)


class _Checkpointed(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.remat(nn.Conv)(8, (3, 3))(x))
    x = jax.checkpoint(lambda y: nn.relu(y) * 2)(nn.Conv(6, (3, 3))(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def test_checkpointed_layers_are_read_in_place():
  pruner, x = _linen(_Checkpointed())
  assert pruner.structure.prunable == ('CheckpointConv_0', 'Conv_0')
  assert pruner.cost().macs == 8 * 8 * (3 * 3 * 3 * 8) + 8 * 8 * (3 * 3 * 8 * 6) + 6 * 10
  _assert_shrunk_equals_masked(pruner, x)


class _ClassToken(nn.Module):
  """big_vision's ViT with pool_type='tok': a (1, 1, D) token tiled over the batch."""

  @nn.compact
  def __call__(self, x):
    b = x.shape[0]
    x = nn.Conv(16, (4, 4), strides=4)(x).reshape(b, -1, 16)
    token = self.param('cls', nn.initializers.zeros, (1, 1, 16))
    x = jnp.concatenate([jnp.tile(token, (b, 1, 1)), x], axis=1)
    hidden = nn.gelu(nn.Dense(32)(nn.LayerNorm()(x)))
    x = x + nn.Dense(16)(hidden)
    return nn.Dense(10)(x[:, 0])


def test_a_class_token_tiled_over_the_batch():
  pruner, x = _linen(_ClassToken())
  assert pruner.structure.prunable == ('Dense_0',) and pruner.groups['Dense_0'].width == 32
  _assert_shrunk_equals_masked(pruner, x)


class _Heads(nn.Module):
  unused_head: bool

  @nn.compact
  def __call__(self, x):
    x = jnp.mean(nn.relu(nn.Conv(8, (3, 3))(x)), axis=(1, 2))
    if self.unused_head:
      nn.Dense(5, name='unused')(x)
    return nn.Dense(10, name='head')(x)


def test_an_unused_head_costs_no_macs():
  with_head, _ = _linen(_Heads(unused_head=True))
  without, _ = _linen(_Heads(unused_head=False))
  assert with_head.cost().macs == without.cost().macs == 8 * 8 * (3 * 3 * 3 * 8) + 8 * 10
