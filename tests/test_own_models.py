"""Models of a user's own making through `jaxprune.Pruner`: RNG state, attention, tuple
outputs, boxed Linen variables and the messages a wrong argument or an unsupported
construct gets (one sentence naming what is wrong)."""

import ast
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import Pruner
from jaxprune.errors import ConfigError
from random_variables import random_like

IMAGES = (4, 8, 8, 3)


def _batch(shape=IMAGES, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape).astype(np.float32),
          rng.integers(0, classes, shape[0]).astype(np.int32))


def _linen(module, x, **kwargs):
  variables = random_like(jax.eval_shape(module.init, jax.random.key(0), x))
  return Pruner(module.apply, variables, x, **kwargs)


def _assert_shrunk_module_is_masked(pruner, masks, x):
  small = pruner.shrink(masks)
  small.module.eval()
  expected = pruner.apply(pruner.variables, x, masks)
  np.testing.assert_allclose(small.module(x), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(small.apply(small.variables, x), expected, rtol=1e-5, atol=1e-6)
  return small


# 1. RNG state is carried through, never a channel.

class _DropoutCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.conv2 = nnx.Conv(8, 12, (3, 3), rngs=rngs)
    self.head = nnx.Linear(12, 10, rngs=rngs)

  def __call__(self, x):
    x = self.drop(nnx.relu(self.conv1(x)))
    return self.head(nnx.relu(self.conv2(x)).mean(axis=(1, 2)))


def test_dropout_rng_state_is_carried_through_scoring_and_shrinking():
  x, labels = _batch()
  pruner = Pruner(_DropoutCNN(nnx.Rngs(0)), example_batch=x)
  assert set(pruner.structure.prunable) == {'conv1', 'conv2'}
  assert not any('rng' in key[0] for g in pruner.groups.values() for key, _, _ in g.leaves)
  taylor = pruner.score('taylor', [(x, labels)])
  l1 = pruner.score('l1')
  assert set(taylor) == set(l1) == {'conv1', 'conv2'}
  masks = pruner.select('global', taylor, ratio=0.5)
  small = _assert_shrunk_module_is_masked(pruner, masks, x)
  assert small.module.conv2.in_features == int(masks['conv1'].sum())


# 2. Attention: whole heads, the head dimension kept.

class _Attention(nnx.Module):
  def __init__(self, rngs, dropout_rate=0.1):
    self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=16, qkv_features=16,
                                       dropout_rate=dropout_rate, decode=False, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(x))
    b, h, w, c = x.shape
    return self.head(self.attn(x.reshape(b, h * w, c)).mean(axis=1))


@pytest.mark.parametrize('dropout_rate', [0.1, 0.0])
def test_attention_prunes_whole_heads_and_the_shrunk_module_equals_the_masked(dropout_rate):
  x, _ = _batch()
  pruner = Pruner(_Attention(nnx.Rngs(0), dropout_rate), example_batch=x)
  heads = pruner.groups['attn/query']
  assert heads.prunable and heads.width == 4
  assert (('params', 'attn', 'out', 'kernel'), 0, 0) in heads.leaves
  head_dims = [g for g in pruner.groups.values()
               if (('params', 'attn', 'query', 'kernel'), 2, 0) in g.leaves
               or (('params', 'attn', 'value', 'kernel'), 2, 0) in g.leaves]
  assert len(head_dims) == 2
  assert all(not g.prunable and '1/sqrt(head_dim)' in g.reason for g in head_dims)
  l1 = pruner.score('l1')
  query = np.abs(np.asarray(pruner.variables['params']['attn']['query']['kernel']))
  assert np.all(l1['attn/query'] > query.sum(axis=(0, 2)))
  masks = {'conv': (np.arange(16) % 3 != 0), 'attn/query': np.array([1, 0, 1, 1]),
           'attn/out': (np.arange(16) % 4 != 1)}
  masks = {g: m.astype(np.float32) for g, m in masks.items()}
  small = _assert_shrunk_module_is_masked(pruner, masks, x)
  attn = small.module.attn
  assert (attn.num_heads, attn.head_dim, attn.in_features, attn.out_features) == (3, 4, 10, 12)
  assert attn.out.in_features == (3, 4) and attn.query.out_features == (3, 4)


# 3. fixed=[...] is the way around a primitive jaxprune does not know.

class _Sorted(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name='conv1')(x))
    x = jnp.sort(nn.Conv(8, (3, 3), name='conv2')(x), axis=-1)
    return nn.Dense(10, name='head')(nn.Conv(8, (3, 3), name='conv3')(x).mean(axis=(1, 2)))


def test_following_the_fixed_advice_of_an_unknown_primitive_works():
  x, _ = _batch()
  with pytest.raises(ConfigError, match='primitive sort') as error:
    _linen(_Sorted(), x)
  advice = re.search(r'fixed=(\[.*?\])', str(error.value)).group(1)
  pruner = _linen(_Sorted(), x, fixed=ast.literal_eval(advice))
  assert not pruner.groups['conv2'].prunable
  assert pruner.groups['conv2'].reason.startswith('kept by fixed=')
  assert pruner.groups['conv1'].prunable and pruner.groups['conv3'].prunable


# 4. A model returning (logits, features) is scored on its logits.

class _WithFeatures(nn.Module):
  features: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(12, (3, 3))(x)).mean(axis=(1, 2))
    logits = nn.Dense(10)(x)
    return (logits, x) if self.features else logits


def test_a_model_returning_logits_and_features_is_scored_on_the_logits():
  x, labels = _batch()
  variables = random_like(jax.eval_shape(_WithFeatures().init, jax.random.key(0), x))
  both = Pruner(_WithFeatures().apply, variables, x)
  logits_only = Pruner(_WithFeatures(features=False).apply, variables, x)
  scores = both.score('taylor', [(x, labels)])
  expected = logits_only.score('taylor', [(x, labels)])
  assert set(scores) == {'Conv_0'}  # Conv_1's channels are an output too
  np.testing.assert_allclose(scores['Conv_0'], expected['Conv_0'], rtol=1e-5)


# 5. Linen variables boxed by nn.with_logical_partitioning.

class _Partitioned(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('embed', 'mlp'))
    x = nn.relu(nn.Dense(16, kernel_init=init)(x.mean(axis=(1, 2))))
    return nn.Dense(10, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ('mlp', 'vocab')))(x)


def test_logically_partitioned_variables_are_unboxed():
  x, labels = _batch()
  variables = _Partitioned().init(jax.random.key(0), x)
  assert isinstance(variables['params']['Dense_0']['kernel'], nn.LogicallyPartitioned)
  pruner = Pruner(_Partitioned().apply, variables, x)
  assert pruner.structure.prunable == ('Dense_0',)
  kernel = np.asarray(nn.meta.unbox(variables)['params']['Dense_0']['kernel'])
  np.testing.assert_allclose(pruner.score('l1')['Dense_0'], np.abs(kernel).sum(0), rtol=1e-6)
  # float32 through two separately compiled programs: sums may be ordered differently.
  np.testing.assert_allclose(pruner.apply(variables, x), _Partitioned().apply(variables, x),
                             rtol=1e-5, atol=1e-7)
  masks = {'Dense_0': (np.arange(16) % 2).astype(np.float32)}
  small = pruner.shrink(masks, variables)
  np.testing.assert_allclose(small.apply(small.variables, x),
                             pruner.apply(variables, x, masks), rtol=1e-5, atol=1e-6)


# 6. Wrong arguments are one sentence naming the value.

class _Small(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Conv(8, (3, 3))(x)).mean(axis=(1, 2)))


class _NeedsTrain(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


class _NothingToPrune(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def _small():
  return _linen(_Small(), _batch()[0])


def _wrong_channels():
  pruner = _small()
  Pruner(_Small().apply, pruner.variables, np.zeros((4, 8, 8, 5), np.float32))


def _wrong_rank():
  Pruner(_DropoutCNN(nnx.Rngs(0)), example_batch=np.zeros((8, 8, 3), np.float32))


def _not_flax():
  Pruner('resnet20', {}, _batch()[0])


def _train_not_bound():
  x = _batch()[0]
  variables = _NeedsTrain().init(jax.random.key(0), x, train=False)
  Pruner(_NeedsTrain(), variables, x)


def _ratio_string():
  pruner = _small()
  pruner.select('global', pruner.score('l1'), ratio='0.5')


def _labels_out_of_range():
  x, labels = _batch()
  _small().score('taylor', [(x, labels + 10)])


def _nothing_to_prune():
  pruner = _linen(_NothingToPrune(), _batch()[0])
  pruner.select('global', pruner.score('l1'), ratio=0.5)


@pytest.mark.parametrize('wrong, names', [
    (_wrong_channels, ['(4, 8, 8, 5)', 'do not fit the model']),
    (_wrong_rank, ['(8, 8, 3)', 'do not fit the model']),
    (_not_flax, ["'resnet20'", 'nnx.Module']),
    (_train_not_bound, ["['train']", 'train=False']),
    (_ratio_string, ["ratio='0.5'", '[0, 1)']),
    (_labels_out_of_range, ['outside the model', '10 classes']),
    (_nothing_to_prune, ["select('global')", 'the input', 'the output']),
], ids=lambda v: getattr(v, '__name__', '').strip('_') or None)
def test_wrong_arguments_are_one_sentence_naming_the_value(wrong, names):
  with pytest.raises(ConfigError) as error:
    wrong()
  message = str(error.value)
  assert '\n' not in message and message.endswith('.'), message
  for name in names:
    assert name in message, message


# 7. Refusals say what they refuse.

class _GatedGroupNorm(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.gate = nnx.Linear(8, 8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.norm = nnx.GroupNorm(8, num_groups=2, rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = x * nnx.sigmoid(self.gate(x.mean(axis=(1, 2))))[:, None, None, :]  # squeeze-excite
    return self.head(nnx.relu(self.norm(self.conv2(x))).mean(axis=(1, 2)))


def test_a_gate_and_a_group_norm_are_named_in_their_refusals():
  pruner = Pruner(_GatedGroupNorm(nnx.Rngs(0)), example_batch=_batch()[0])
  gated, grouped = pruner.groups['conv1'], pruner.groups['conv2']
  assert not gated.prunable and 'multiplied elementwise' in gated.reason
  assert 'a stream written' not in gated.reason
  assert not grouped.prunable and 'GroupNorm(2)' in grouped.reason
  assert 'groups of 4' in grouped.reason


class _OwnWeight(nnx.Module):
  """A matmul with a weight of its own name: no `kernel` writes its channels."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 6)))
    self.head = nnx.Linear(6, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(x)).mean(axis=(1, 2))
    return self.head(nnx.relu(x @ self.w[...]))


def test_weight_criteria_weigh_a_group_no_kernel_writes_by_the_kernels_reading_it():
  pruner = Pruner(_OwnWeight(nnx.Rngs(0)), example_batch=_batch()[0])
  assert set(pruner.structure.prunable) == {'conv', 'params/w'}
  l1 = pruner.score('l1')
  head = np.asarray(pruner.variables['params']['head']['kernel'])
  np.testing.assert_allclose(l1['params/w'], np.abs(head).sum(axis=1), rtol=1e-6)
