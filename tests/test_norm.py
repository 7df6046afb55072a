"""norm.BatchNorm against nn.BatchNorm: variables, values, running statistics, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import models, train
from jaxprune.errors import ConfigError
from jaxprune.kernels import norm
from jaxprune.kernels.options import PerformanceOptions

SETTINGS = dict(momentum=0.9, epsilon=1e-5)


def inputs(shape=(6, 5, 5, 4), seed=0):
  # Channels with different means and scales; the mean is large next to the spread in one.
  rng = np.random.default_rng(seed)
  spread = np.array([1., 3., 0.2, 2.])[:shape[-1]]
  offset = np.array([0., 1., 40., -2.])[:shape[-1]]
  return jnp.asarray(rng.normal(size=shape) * spread + offset, jnp.float32)


def trained_variables(x):
  variables = nn.BatchNorm(use_running_average=False, **SETTINGS).init(jax.random.key(0), x)
  c = x.shape[-1]
  return {'params': {'scale': jnp.linspace(0.5, 2., c), 'bias': jnp.linspace(-1., 1., c)},
          'batch_stats': {'mean': variables['batch_stats']['mean'] + 0.3,
                          'var': variables['batch_stats']['var'] * 1.7}}


def loss_and_stats(module, variables, x, weights):
  """A loss of the output *and* the updated statistics, so every cotangent is nonzero."""
  y, updated = module.apply(variables, x, mutable=['batch_stats'])
  stats = updated['batch_stats']
  loss = (jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights)
          + jnp.sum(stats['mean'] * jnp.arange(1., 1. + x.shape[-1]))
          + jnp.sum(jnp.square(stats['var'])))
  return loss, (y, stats)


def test_variables_are_nn_batch_norms():
  x = inputs()
  ours = norm.BatchNorm(**SETTINGS).init(jax.random.key(3), x)
  theirs = nn.BatchNorm(use_running_average=False, **SETTINGS).init(jax.random.key(3), x)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_training_values_statistics_and_gradients_equal_nn_batch_norms():
  x = inputs()
  variables = trained_variables(x)
  weights = jax.random.normal(jax.random.key(1), x.shape)
  grad = jax.value_and_grad(loss_and_stats, argnums=(1, 2), has_aux=True)
  (loss, (y, stats)), grads = grad(norm.BatchNorm(**SETTINGS), variables, x, weights)
  (ref_loss, (ref_y, ref_stats)), ref_grads = grad(
      nn.BatchNorm(use_running_average=False, **SETTINGS), variables, x, weights)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), stats, ref_stats)
  (dparams, dx), (ref_dparams, ref_dx) = grads, ref_grads
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-3, atol=1e-4)
  for name in ('scale', 'bias'):
    np.testing.assert_allclose(dparams['params'][name], ref_dparams['params'][name],
                               rtol=1e-4, atol=1e-5)
  # The gradient really depends on the statistics' cotangents (they are part of the loss).
  assert not np.allclose(dx, jax.grad(lambda z: jnp.sum(jnp.sin(norm.BatchNorm(**SETTINGS).apply(
      variables, z, mutable=['batch_stats'])[0]) * weights))(x), atol=1e-3)


def test_evaluation_uses_the_running_statistics_like_nn_batch_norm():
  x = inputs()
  variables = trained_variables(x)
  y = norm.BatchNorm(use_running_average=True, **SETTINGS).apply(variables, x)
  ref = nn.BatchNorm(use_running_average=True, **SETTINGS).apply(variables, x)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_initialisation_leaves_the_running_statistics_at_their_init_values():
  variables = norm.BatchNorm(**SETTINGS).init(jax.random.key(0), inputs())
  np.testing.assert_array_equal(variables['batch_stats']['mean'], 0.)
  np.testing.assert_array_equal(variables['batch_stats']['var'], 1.)


def test_a_constant_zero_channel_gets_finite_gradients_equal_to_nn_batch_norms():
  x = inputs().at[..., 1].set(0.)
  variables = trained_variables(x)
  weights = jax.random.normal(jax.random.key(2), x.shape)
  grad = jax.grad(lambda m, v, z: loss_and_stats(m, v, z, weights)[0], argnums=(1, 2))
  ours = grad(norm.BatchNorm(**SETTINGS), variables, x)
  theirs = grad(nn.BatchNorm(use_running_average=False, **SETTINGS), variables, x)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(ours))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), ours, theirs)


def test_bfloat16_input_keeps_float32_statistics_and_nn_batch_norms_output_dtype():
  x = inputs().astype(jnp.bfloat16)
  variables = trained_variables(x)
  variables['params'] = jax.tree.map(lambda p: p.astype(jnp.bfloat16), variables['params'])
  weights = jax.random.normal(jax.random.key(1), x.shape)
  grad = jax.value_and_grad(loss_and_stats, argnums=(1, 2), has_aux=True)
  (_, (y, stats)), (dparams, dx) = grad(norm.BatchNorm(**SETTINGS), variables, x, weights)
  (_, (ref_y, ref_stats)), (ref_dparams, ref_dx) = grad(
      nn.BatchNorm(use_running_average=False, **SETTINGS), variables, x, weights)
  assert y.dtype == ref_y.dtype == jnp.bfloat16
  assert dx.dtype == jnp.bfloat16 and dparams['params']['scale'].dtype == jnp.bfloat16
  assert {s.dtype for s in jax.tree.leaves(stats)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(y.astype(jnp.float32), ref_y.astype(jnp.float32), rtol=2e-2,
                             atol=2e-2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), stats, ref_stats)
  np.testing.assert_allclose(dx.astype(jnp.float32), ref_dx.astype(jnp.float32), rtol=5e-2,
                             atol=5e-2)


@pytest.mark.parametrize('name', ['resnet20', 'vgg11', 'densenet10'])
def test_a_models_loss_gradients_and_statistics_equal_those_with_nn_batch_norm(name):
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  labels = jnp.arange(8) % 10
  variables = models.init(models.build(name), jax.random.key(1), x.shape[1:])

  def step(impl):
    model = models.build(name, performance=PerformanceOptions(batch_norm=impl))

    def loss_fn(params):
      logits, updated = model.apply({**variables, 'params': params}, x, train=True,
                                    mutable=['batch_stats'])
      return jnp.mean(train.cross_entropy(logits, labels)), updated['batch_stats']
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])

  (loss, stats), grads = step('jaxprune')
  (ref_loss, ref_stats), ref_grads = step('flax')
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), stats,
               ref_stats)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale),
               grads, ref_grads)


def test_the_models_options_choose_the_module_and_both_have_the_same_variables():
  x = jnp.zeros((1, 8, 8, 3))
  norms, shapes = {}, {}
  for impl in ('jaxprune', 'flax'):
    model = models.build('tiny', performance=PerformanceOptions(batch_norm=impl))
    called = set()

    def record(next_fun, args, kwargs, context):
      called.add(type(context.module))
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(record):
      variables = jax.eval_shape(model.init, jax.random.key(0), x)
    norms[impl] = called & {norm.BatchNorm, nn.BatchNorm}
    shapes[impl] = jax.tree.map(jnp.shape, variables)
  assert norms == {'jaxprune': {norm.BatchNorm}, 'flax': {nn.BatchNorm}}
  assert shapes['jaxprune'] == shapes['flax']


def test_an_unknown_implementation_is_one_sentence_naming_the_setting():
  with pytest.raises(ConfigError, match=r"^unknown batch_norm 'cudnn'; choose one of: flax, "
                                        r"jaxprune\.$") as error:
    PerformanceOptions(batch_norm='cudnn')
  assert error.value.settings == ('batch_norm',)
