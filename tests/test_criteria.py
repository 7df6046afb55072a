"""Every criterion against an independent brute-force computation.

Gradient criteria are checked against per-example loops that differentiate one
example's loss w.r.t. offsets added to the activations (not the gates the
criteria use) and multiply by the sown activation; the oracle against removing one
channel at a time with a full forward pass; second_order against float64 finite
differences; weight, BN and activation criteria against numpy on the raw
variables and the sown activations. Models: `tiny` trained briefly on sklearn's
8x8 digits, and `preresnet11` (the smallest model with channel selection) at a
quarter width with perturbed BN statistics and shuffled selection indices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import count_compiles
from flax import traverse_util
from sklearn.datasets import load_digits

from jaxprune import models
from jaxprune.prune import criteria, program
from jaxprune.errors import ConfigError

GRADIENT_CRITERIA = ('taylor', 'taylor_signed_mean', 'taylor_abs_elementwise', 'taylor_fo',
                     'fisher')


def _loss(model, variables, x, y, masks):
  logits = model.apply(variables, x, train=False, masks=masks)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _random_variables(model, x, seed):
  """Variables of the model's shapes filled by numpy: He-scaled kernels, non-trivial BN
  statistics and shuffled selection indices (compiling `init` would take seconds)."""
  rng = np.random.default_rng(seed)
  shapes = traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), x))
  flat = {}
  for key, leaf in shapes.items():
    shape = leaf.shape
    if key[-1] == 'kernel':
      value = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
    elif key[-1] in ('mean', 'bias'):
      value = rng.normal(0, 0.3, shape)
    elif key[-1] in ('var', 'scale'):
      value = rng.uniform(0.5, 1.5, shape)
    else:
      assert key[-1] == 'input_channels', key
      value = rng.permutation(shape[0])
    flat[key] = jnp.asarray(value, leaf.dtype)
  return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope='module')
def tiny():
  """`tiny` trained 150 Adam steps on digits; two held-out batches of 8; masks removing a few channels."""
  digits = load_digits()
  x = (digits.images[..., None] / 16.0 - 0.5).astype(np.float32)
  y = digits.target.astype(np.int32)
  model = models.build('tiny')
  variables = _random_variables(model, x[:8], seed=0)
  opt = optax.adam(1e-2)

  @jax.jit
  def step(variables, opt_state, xb, yb):
    def loss_fn(params):
      logits, new = model.apply({**variables, 'params': params}, xb, train=True,
                                mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new
    grads, new = jax.grad(loss_fn, has_aux=True)(variables['params'])
    updates, opt_state = opt.update(grads, opt_state)
    return {'params': optax.apply_updates(variables['params'], updates), **new}, opt_state

  opt_state = opt.init(variables['params'])
  rng = np.random.default_rng(0)
  for _ in range(150):
    idx = rng.integers(0, len(x) - 16, 8)
    variables, opt_state = step(variables, opt_state, x[idx], y[idx])
  batches = [{'image': jnp.asarray(x[i:i + 8]), 'label': jnp.asarray(y[i:i + 8])}
             for i in (len(x) - 16, len(x) - 8)]
  masks = {'conv2': np.ones(16, np.float32), 'fc': np.ones(16, np.float32)}
  masks['conv2'][[2, 9]] = 0
  masks['fc'][5] = 0
  untrained = _random_variables(model, x[:8], seed=0)
  prog = program.derive(model, (8, 8, 1))
  return prog, variables, batches, masks, prog.structure, untrained


@pytest.fixture(scope='module')
def preresnet():
  """preresnet11 (channel selection) at a quarter width, 8x8, batch 3, non-trivial BN and indices."""
  model = models.build('preresnet11', widths={g: max(1, w // 4) for g, w in
                       models.widths_of(models.build('preresnet11')).items()})
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
  variables = _random_variables(model, x, seed=1)
  batch = {'image': x, 'label': jnp.array([1, 4, 7], jnp.int32)}
  masks = {'stage2_block1_in': np.ones(16, np.float32),
           'stage3_block1_mid1': np.ones(16, np.float32)}
  masks['stage2_block1_in'][3] = 0
  masks['stage3_block1_mid1'][[0, 11]] = 0
  prog = program.derive(model, (8, 8, 3))
  return prog, variables, [batch], masks, prog.structure


def _full(st, masks):
  return {g: jnp.asarray(masks.get(g, np.ones(st.widths[g])), jnp.float32) for g in st.prunable}


def _brute_activation_gradients(model, variables, batches, masks, st):
  """Per batch, {group: (z * dCE_n/dz) of shape (B, H, W, C) or (B, C)}, example by example.

  dCE_n/dz is the gradient of one example's loss w.r.t. an offset added to the
  activation (independent of the gate mechanism the criteria use); z is the sown
  masked activation.
  """
  masks = _full(st, masks)

  @jax.jit
  def one_example(x1, y1):
    _, state = model.apply(variables, x1[None], masks=masks, mutable=['intermediates'])
    z = {g: a[0] for g, a in state['intermediates'].items()}

    def loss(offsets):
      logits = model.apply(variables, x1[None], train=False, masks=masks, offsets=offsets)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y1[None])[0]

    dz = jax.grad(loss)({g: jnp.zeros_like(a) for g, a in z.items()})
    return {g: z[g] * dz[g] for g in z}

  out = []
  for batch in batches:
    rows = [one_example(batch['image'][n], batch['label'][n])
            for n in range(batch['image'].shape[0])]
    out.append({g: np.concatenate([np.asarray(r[g]) for r in rows]) for g in st.prunable})
  return out


def _expected_gradient_scores(name, products):
  """The criterion from per-example, per-position z * dCE_n/dz of each batch."""
  per_example = [{g: p.reshape(p.shape[0], -1, p.shape[-1]) for g, p in b.items()}
                 for b in products]
  groups = per_example[0]
  if name == 'taylor_abs_elementwise':
    return {g: np.concatenate([np.abs(b[g]).mean(1) for b in per_example]).mean(0)
            for g in groups}
  hw_mean = {g: np.concatenate([b[g].mean(1) for b in per_example]) for g in groups}
  g_n = {g: np.concatenate([b[g].sum(1) for b in per_example]) for g in groups}
  if name == 'taylor':
    return {g: np.abs(v).mean(0) for g, v in hw_mean.items()}
  if name == 'taylor_signed_mean':
    return {g: np.abs(v.mean(0)) for g, v in hw_mean.items()}
  if name == 'fisher':
    return {g: (v ** 2).sum(0) / (2 * len(v)) for g, v in g_n.items()}
  # taylor_fo: the square of the sum over batch and space of z * dL/dz, L the
  # batch's mean loss, averaged over batches.
  return {g: np.mean([(b[g].sum((0, 1)) / len(b[g])) ** 2 for b in per_example], 0)
          for g in groups}


def _brute_oracle(model, variables, batches, masks, st):
  masks = _full(st, masks)
  x = jnp.concatenate([b['image'] for b in batches])
  y = jnp.concatenate([b['label'] for b in batches])
  mean_loss = jax.jit(lambda m: jnp.mean(_loss(model, variables, x, y, m)))
  base = float(mean_loss(masks))
  out = {}
  for g in st.prunable:
    out[g] = np.zeros(st.widths[g])
    for k in range(st.widths[g]):
      removed = {**masks, g: masks[g].at[k].set(0.0)}
      out[g][k] = abs(float(mean_loss(removed)) - base)
  return out


def _assert_scores(got, want, st, rtol=1e-4, atol=1e-6):
  assert set(got) == set(st.prunable)
  for g in st.prunable:
    assert got[g].shape == (st.widths[g],), g
    np.testing.assert_allclose(got[g], want[g], rtol=rtol, atol=atol, err_msg=g)


def test_tiny_training_lowered_the_held_out_loss(tiny):
  model, variables, batches, _, _, untrained = tiny
  loss = lambda v: np.mean([_loss(model, v, b['image'], b['label'], None) for b in batches])
  assert loss(variables) < 0.7 * loss(untrained)


@pytest.fixture(scope='module')
def tiny_products(tiny):
  model, variables, batches, masks, st, _ = tiny
  return _brute_activation_gradients(model, variables, batches, masks, st)


@pytest.fixture(scope='module')
def preresnet_products(preresnet):
  model, variables, batches, masks, st = preresnet
  return _brute_activation_gradients(model, variables, batches, masks, st)


@pytest.mark.parametrize('name', GRADIENT_CRITERIA)
def test_gradient_criteria_match_per_example_loop(tiny, tiny_products, name):
  model, variables, batches, masks, st, _ = tiny
  got = criteria.score(name, model, variables, batches, masks=masks)
  _assert_scores(got, _expected_gradient_scores(name, tiny_products), st)


@pytest.mark.parametrize('name', ('taylor', 'fisher'))
def test_gradient_criteria_match_per_example_loop_with_channel_selection(
    preresnet, preresnet_products, name):
  model, variables, batches, masks, st = preresnet
  got = criteria.score(name, model, variables, batches, masks=masks)
  _assert_scores(got, _expected_gradient_scores(name, preresnet_products), st, rtol=1e-3,
                 atol=1e-6)


def test_oracle_matches_one_channel_at_a_time_loop_on_trained_model(tiny):
  model, variables, batches, masks, st, _ = tiny
  got = criteria.score('oracle', model, variables, batches, masks=masks)
  _assert_scores(got, _brute_oracle(model, variables, batches, masks, st), st, atol=2e-6)


def test_oracle_chunking_and_unshared_prefix_give_the_same_scores(tiny):
  model, variables, batches, masks, st, _ = tiny
  base = criteria.score('oracle', model, variables, batches, masks=masks)
  chunked = criteria.score('oracle', model, variables, batches, masks=masks,
                           chunk_size=3)
  unshared = criteria.score('oracle', model, variables, batches, masks=masks,
                            chunk_size=7, share_prefix=False)
  _assert_scores(chunked, base, st, atol=1e-6)
  _assert_scores(unshared, base, st, atol=1e-6)


def test_oracle_matches_loop_with_channel_selection(preresnet):
  model, variables, batches, masks, st = preresnet
  got = criteria.score('oracle', model, variables, batches, masks=masks,
                       chunk_size=12)
  _assert_scores(got, _brute_oracle(model, variables, batches, masks, st), st, rtol=1e-3,
                 atol=1e-5)


def test_second_order_matches_float64_finite_differences(tiny):
  model, variables, batches, masks, st, _ = tiny
  got = criteria.score('second_order', model, variables, batches, masks=masks,
                       chunk_size=5)
  # Small enough that no ReLU downstream changes sign (autodiff sees no kinks).
  eps = 1e-5
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64)
                       if jnp.issubdtype(a.dtype, jnp.floating) else a, variables)
    x = jnp.concatenate([b['image'] for b in batches]).astype(jnp.float64)
    y = jnp.concatenate([b['label'] for b in batches])
    full = {g: jnp.asarray(m, jnp.float64) for g, m in _full(st, masks).items()}
    mean_loss = jax.jit(lambda m: jnp.mean(_loss(model, v64, x, y, m)))
    base = float(mean_loss(full))
    want = {}
    for g in st.prunable:
      want[g] = np.zeros(st.widths[g])
      for k in range(st.widths[g]):
        up = float(mean_loss({**full, g: full[g].at[k].multiply(1 + eps)}))
        down = float(mean_loss({**full, g: full[g].at[k].multiply(1 - eps)}))
        grad, hess = (up - down) / (2 * eps), (up - 2 * base + down) / eps ** 2
        want[g][k] = abs(-grad + 0.5 * hess)
  _assert_scores(got, want, st, rtol=2e-3, atol=1e-5)


def test_weight_criteria_reduce_each_output_filter(tiny):
  model, variables, _, _, st, _ = tiny
  p = variables['params']
  filters = {'conv1': np.asarray(p['conv1_conv']['kernel']).reshape(-1, 8),
             'conv2': np.asarray(p['conv2_conv']['kernel']).reshape(-1, 16),
             'fc': np.asarray(p['fc_dense']['kernel'])}
  for name, fn in (('l1', lambda w: np.abs(w).sum(0)), ('l2', lambda w: np.sqrt((w ** 2).sum(0))),
                   ('min_weight', lambda w: (w ** 2).mean(0))):
    got = criteria.score(name, model, variables, None)
    _assert_scores(got, {g: fn(w) for g, w in filters.items()}, st)


def test_weight_criteria_use_next_layer_inputs_for_channel_selection(preresnet):
  model, variables, _, _, st = preresnet
  p = variables['params']
  filters = {'final': np.asarray(p['head']['kernel']).T}
  for s in (1, 2, 3):
    block = f'stage{s}_block1'
    conv1, conv2 = np.asarray(p[f'{block}_conv1']['kernel']), np.asarray(p[f'{block}_conv2']['kernel'])
    filters[f'{block}_in'] = np.moveaxis(conv1, 2, -1).reshape(-1, conv1.shape[2])
    filters[f'{block}_mid1'] = conv1.reshape(-1, conv1.shape[3])
    filters[f'{block}_mid2'] = conv2.reshape(-1, conv2.shape[3])
  got = criteria.score('l1', model, variables, None)
  _assert_scores(got, {g: np.abs(w).sum(0) for g, w in filters.items()}, st)


def test_bn_scale_is_abs_gamma_of_each_groups_batchnorm(preresnet):
  model, variables, _, _, st = preresnet
  p = variables['params']
  want = {'final': p['final_select']['BatchNorm_0']['scale']}
  for s in (1, 2, 3):
    block = f'stage{s}_block1'
    want[f'{block}_in'] = p[f'{block}_in_select']['BatchNorm_0']['scale']
    want[f'{block}_mid1'] = p[f'{block}_bn2']['scale']
    want[f'{block}_mid2'] = p[f'{block}_bn3']['scale']
  got = criteria.score('bn_scale', model, variables, None)
  _assert_scores(got, {g: np.abs(np.asarray(w)) for g, w in want.items()}, st)


def test_bn_scale_without_batchnorm_raises_config_error_naming_group(tiny):
  model, variables, _, _, st, _ = tiny
  with pytest.raises(ConfigError, match=r"criterion=bn_scale .*\['fc'\]") as info:
    criteria.score('bn_scale', model, variables, None)
  assert info.value.settings == ('criterion', 'model')


@pytest.mark.parametrize('name', ('mean_activation', 'activation_std', 'apoz'))
def test_activation_criteria_match_numpy_over_all_batches(tiny, name):
  model, variables, batches, masks, st, _ = tiny
  acts = {g: [] for g in st.prunable}
  for b in batches:
    _, state = model.apply(variables, b['image'], masks=_full(st, masks), mutable=['intermediates'])
    for g in st.prunable:
      a = np.asarray(state['intermediates'][g][0])
      acts[g].append(a.reshape(-1, a.shape[-1]))
  stat = {'mean_activation': lambda z: z.mean(0), 'activation_std': lambda z: z.std(0),
          'apoz': lambda z: 1 - (z == 0).mean(0)}[name]
  want = {g: stat(np.concatenate(a)) for g, a in acts.items()}
  got = criteria.score(name, model, variables, batches, masks=masks)
  _assert_scores(got, want, st, atol=1e-5)


@pytest.mark.parametrize('name', ('taylor', 'fisher', 'apoz', 'oracle'))
def test_masked_channels_get_zero_from_data_criteria(tiny, name):
  model, variables, batches, masks, st, _ = tiny
  got = criteria.score(name, model, variables, batches, masks=masks)
  for g, m in masks.items():
    assert np.all(got[g][m == 0] == 0)
    assert np.any(got[g][m == 1] > 0)


def test_random_is_reproducible_per_rng_and_uniform(tiny):
  model, variables, _, _, st, _ = tiny
  a = criteria.score('random', model, variables, None, rng=jax.random.key(3))
  b = criteria.score('random', model, variables, None, rng=jax.random.key(3))
  c = criteria.score('random', model, variables, None, rng=jax.random.key(4))
  _assert_scores(a, b, st, rtol=0, atol=0)
  assert not np.allclose(a['conv2'], c['conv2'])
  assert all(np.all((s >= 0) & (s < 1)) for s in a.values())


def test_new_mask_values_do_not_recompile(tiny, caplog):
  model, variables, batches, masks, st, _ = tiny
  criterion = criteria.CRITERIA['taylor']
  step = criteria.accumulator(criterion, model)
  state = criterion.init(st)
  full = _full(st, masks)
  state = step(state, variables, full, batches[0])
  _, compiles = count_compiles(
      caplog, lambda: step(state, variables, {**full, 'conv1': full['conv1'].at[0].set(0.0)},
                           batches[1]), '_accumulate')
  assert compiles == 0


def test_accumulating_two_batches_equals_scoring_their_concatenation(tiny):
  model, variables, batches, masks, st, _ = tiny
  joined = [{k: jnp.concatenate([b[k] for b in batches]) for k in batches[0]}]
  for name in ('fisher', 'activation_std'):
    got = criteria.score(name, model, variables, batches, masks=masks)
    want = criteria.score(name, model, variables, joined, masks=masks)
    _assert_scores(got, want, st, atol=1e-6)


def test_unknown_criterion_raises_config_error_naming_it(tiny):
  model, variables, batches, _, st, _ = tiny
  with pytest.raises(ConfigError, match=r"unknown criterion 'taylr'.*taylor") as info:
    criteria.score('taylr', model, variables, batches)
  assert info.value.settings == ('criterion',)


def test_data_criterion_without_batches_is_a_bug_not_a_config_error(tiny):
  model, variables, _, _, st, _ = tiny
  with pytest.raises(ValueError, match="'fisher'") as info:
    criteria.score('fisher', model, variables, [])
  assert not isinstance(info.value, ConfigError)


def test_masks_of_the_wrong_shape_are_a_bug_not_a_config_error(tiny):
  model, variables, batches, _, st, _ = tiny
  with pytest.raises(ValueError, match=r"'conv1' has shape \(3,\)") as info:
    criteria.score('taylor', model, variables, batches, masks={'conv1': np.ones(3)})
  assert not isinstance(info.value, ConfigError)


def test_unknown_option_is_a_bug_listing_the_options():
  with pytest.raises(ValueError, match=r"'chunk'.*chunk_size") as info:
    criteria.get('oracle', chunk=3)
  assert not isinstance(info.value, ConfigError)


@pytest.mark.parametrize('value', [0, -2, 1.5])
def test_a_size_option_that_is_not_a_positive_integer_is_a_config_error(value):
  with pytest.raises(ConfigError, match=f'chunk_size must be a positive integer, got {value}'
                     ) as info:
    criteria.get('oracle', chunk_size=value)
  assert info.value.settings == ('chunk_size',)
