"""Weight-level magnitude pruning: the masks, their MACs, and every regime holding them."""

import numpy as np
import pytest
from flax import traverse_util

from jaxprune import models
from jaxprune.errors import ConfigError
from jaxprune.prune import flops, program, weights

IMAGE = (8, 8, 3)


def random_conv_params(name: str, seed: int = 0):
  struct = program.derive(models.build(name), IMAGE).structure
  rng = np.random.default_rng(seed)
  params = traverse_util.unflatten_dict(
      {key[1:]: rng.normal(size=shape).astype(np.float32)
       for key, shape in struct.shapes.items() if key[0] == 'params'})
  return struct, params


@pytest.mark.parametrize('ratio', [0.0, 0.3, 0.8])
def test_global_threshold_removes_int_total_times_ratio_plus_one_conv_weights(ratio):
  struct, params = random_conv_params('resnet8')
  masks = traverse_util.flatten_dict(weights.magnitude_masks(struct, params, ratio, 'global'))
  kernels = weights.conv_kernels(struct)
  assert sorted(masks) == sorted(kernels) and kernels
  total = sum(masks[k].size for k in kernels)
  removed = sum(int(np.sum(masks[k] == 0)) for k in kernels)
  # [R]'s threshold is |w| sorted at int(total * ratio); a weight at it is removed too.
  assert removed == int(total * ratio) + 1
  flat = traverse_util.flatten_dict(params)
  kept = np.concatenate([np.abs(flat[k])[masks[k] == 1] for k in kernels])
  dropped = np.concatenate([np.abs(flat[k])[masks[k] == 0] for k in kernels])
  assert kept.min() > dropped.max()
  assert not any(k[-1] != 'kernel' or flat[k].ndim != 4 for k in masks)  # convs only


def test_layer_threshold_prunes_every_conv_by_the_ratio():
  struct, params = random_conv_params('resnet8', seed=1)
  masks = traverse_util.flatten_dict(weights.magnitude_masks(struct, params, 0.5, 'layer'))
  for key, mask in masks.items():
    assert int(np.sum(mask == 0)) == int(mask.size * 0.5) + 1, key


def test_masked_macs_are_the_nonzero_weights_multiply_accumulates():
  struct, params = random_conv_params('preresnet11')
  masks = weights.magnitude_masks(struct, params, 0.7, 'global')
  cost = flops.count_masked(struct, masks)
  by_hand = sum(n * (int(np.count_nonzero(traverse_util.flatten_dict(masks)[key[1:]]))
                     if key[1:] in traverse_util.flatten_dict(masks)
                     else int(np.prod(struct.shapes[key])))
                for key, n in struct.positions.items())
  assert cost.macs == by_hand < flops.count(struct).macs


def test_scratch_init_std_grows_by_one_over_sqrt_density():
  struct, params = random_conv_params('resnet8', seed=2)
  masks = weights.magnitude_masks(struct, params, 0.75, 'layer')
  scaled = traverse_util.flatten_dict(weights.rescale_for_density(params, masks))
  flat = traverse_util.flatten_dict(params)
  for key, mask in traverse_util.flatten_dict(masks).items():
    np.testing.assert_allclose(scaled[key], flat[key] / np.sqrt(mask.mean()), rtol=1e-6)


def test_every_regime_holds_pruned_weights_at_zero_and_scratch_b_pays_the_sparse_macs(
    quick_config):
  from jaxprune import pipeline, train
  from jaxprune.pipeline import stages
  from jaxprune.train import checkpoint
  config = quick_config(granularity='weight', criterion='l1', selection='global',
                        prune_ratio=0.8, regime='all', epochs=2)
  pipeline.validate(config)
  rows = {r['stage']: r for r in pipeline.run(config)['rows']}
  data = stages.load_data(config)
  pruned = stages.prune(config, stages.baseline(config, data), data).pruned
  masks = traverse_util.flatten_dict(pruned.weight_masks)
  full, sparse = flops.count(pruned.structure), pruned.cost()
  assert rows['pruned']['macs'] == sparse.macs < full.macs
  for regime in ('finetune', 'scratch', 'scratch_b', 'lottery'):
    stage, plan = stages.regime_plan(config, regime, pruned, data)
    final = checkpoint.load_final(stage, like=plan.variables)
    start = traverse_util.flatten_dict(plan.variables['params'])
    trained = traverse_util.flatten_dict(final['params'])
    for key, mask in masks.items():
      np.testing.assert_array_equal(trained[key][mask == 0], 0)
      assert np.all(trained[key][mask == 1] != start[key][mask == 1]), (regime, key)
    assert rows[regime]['macs'] == sparse.macs
    np.testing.assert_array_equal(
        traverse_util.flatten_dict(final[train.WEIGHT_MASKS])[key], masks[key])
  assert rows['scratch_b']['epochs'] == int(2 * full.macs / sparse.macs)
  # A second call reads the finished prune stage: the same masks.
  again = stages.prune(config, stages.baseline(config, data), data).pruned
  for key, mask in traverse_util.flatten_dict(again.weight_masks).items():
    np.testing.assert_array_equal(mask, masks[key])


@pytest.mark.parametrize('override, named', [
    ({'criterion': 'taylor'}, 'criterion=taylor'),
    ({'selection': 'macs', 'prune_ratio': None, 'target_macs': 0.5}, 'selection=macs'),
    ({'schedule': 'iterative'}, 'schedule=iterative'),
])
def test_weight_granularity_refuses_channel_settings_in_one_sentence(quick_config, override,
                                                                     named):
  from jaxprune import pipeline
  settings = {'granularity': 'weight', 'criterion': 'l1', 'selection': 'global',
              'prune_ratio': 0.5, **override}
  with pytest.raises(ConfigError, match=named):
    pipeline.validate(quick_config(**settings))


def test_compressed_densenet_halves_the_stream_at_each_transition():
  model = models.build('densenet100_c')
  widths = model.default_widths()
  block = 32 * 12  # 32 layers of growth 12 per block
  assert widths['transition1'] == 24 + block
  assert widths['block2_layer1'] == (24 + block) // 2
  assert widths['transition2'] == (24 + block) // 2 + block
  assert widths['final'] == ((24 + block) // 2 + block) // 2 + block
  small = models.DenseNet(depth=10, compression=2)  # the same rule, two layers a block
  struct = program.derive(small, IMAGE).structure
  assert struct.shapes[('params', 'transition1_conv', 'kernel')] == (1, 1, 48, 24)
  assert struct.shapes[('params', 'block2_layer1_conv', 'kernel')][2] == 24
