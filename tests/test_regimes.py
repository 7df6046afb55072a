"""The regimes' plans: what each retraining trains, and at which cost."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import models, train
from jaxprune.errors import ConfigError
from jaxprune.models import layers
from jaxprune.pipeline import regimes
from jaxprune.prune import flops, program, select

IMAGE = (8, 8, 3)


def pruned_to_half_the_macs(name: str) -> regimes.Pruned:
  """`name` pruned by random scores to half its MACs (the regimes read only the widths)."""
  prog = program.derive(models.build(name), IMAGE)
  struct = prog.structure
  rng = np.random.default_rng(0)
  scores = {g: rng.random(struct.widths[g]) for g in struct.prunable}
  masks = select.select('macs', struct, scores, target_macs=0.5)
  widths = {**struct.widths, **{g: int(m.sum()) for g, m in masks.items()}}
  return regimes.Pruned(prog, masks, widths, variables={}, baseline_init={})


def reduced_plan(name: str, pruned: regimes.Pruned, reduced_match: str) -> regimes.Plan:
  return regimes.plan('reduced', pruned, build=functools.partial(models.build, name, 10),
                      image_shape=IMAGE, epochs=1, optimizer=train.OptimizerConfig(),
                      finetune_epochs=1, finetune_lr=1e-3, scratch_b_cap=None, seed=0,
                      reduced_match=reduced_match)


def stream_reads(model: nn.Module) -> dict[str, tuple[int, int]]:
  """{selection layer: (channels it reads, channels of the stream it reads from)}."""
  reads = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.SelectBnRelu) and context.method_name == '__call__':
      reads[context.module.name] = (context.module.width, args[0].shape[-1])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    # A new function: a cached trace of `model.init` would run no Python, record nothing.
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1,) + IMAGE))
  return reads


def test_a_reduced_densenet_reads_every_channel_it_builds_and_meets_the_macs_target():
  pruned = pruned_to_half_the_macs('densenet10')
  plan = reduced_plan('densenet10', pruned, 'macs')
  reads = stream_reads(plan.model)
  assert len(reads) == len(pruned.structure.prunable)
  assert all(width == stream for width, stream in reads.values()), reads
  target = flops.count(pruned.structure, pruned.widths).macs
  macs = plan.cost(pruned.structure, IMAGE).macs
  print(f'densenet10 reduced: growth {plan.model.growth}, stem {plan.model.stem_width}, '
        f'MACs {macs / target:.3f} of the pruned network\'s')
  assert 0.95 * target <= macs <= target
  assert jax.tree.map(jnp.shape, plan.variables) == jax.tree.map(
      jnp.shape, jax.eval_shape(lambda x: plan.model.init(jax.random.key(0), x),
                                jnp.zeros((1,) + IMAGE)))


def test_params_matched_reduced_keeps_the_stem_and_meets_the_pruned_params():
  pruned = pruned_to_half_the_macs('wrn16_2')
  widths = regimes.uniform_widths(pruned.structure, flops.count(
      pruned.structure, pruned.widths).params, 'params', fixed=('stem',))
  target = flops.count(pruned.structure, pruned.widths).params
  params = flops.count(pruned.structure, widths).params
  print(f'wrn16_2 params-matched reduced: {params / target:.3f} of the pruned params, '
        f"stem {widths['stem']}, stages {[widths[f'stage{s}'] for s in (1, 2, 3)]}")
  assert widths['stem'] == 16
  assert 0.97 * target <= params <= target


def test_scratch_b_scales_explicit_decay_epochs_with_its_epochs():
  pruned = pruned_to_half_the_macs('tiny')
  plan = regimes.plan('scratch_b', pruned, build=functools.partial(models.build, 'tiny', 10),
                      image_shape=IMAGE, epochs=200,
                      optimizer=train.OptimizerConfig(decay_epochs=(60, 120, 160)),
                      finetune_epochs=1, finetune_lr=1e-3, scratch_b_cap=None, seed=0)
  ratio = plan.epochs / 200
  assert ratio > 1.5
  assert plan.optimizer.decay_epochs == tuple(int(m * ratio) for m in (60, 120, 160))


def test_c_schedule_pad_mode_and_finetune_batch_reach_the_trained_stages(quick_config):
  from jaxprune import pipeline
  from jaxprune.pipeline import stages
  from jaxprune.train import checkpoint
  config = quick_config(epochs=4, lr_decay_epochs='1,3', lr_decay_factor=0.2,
                        pad_mode='reflect', finetune_batch_size=16, regime='finetune')
  pipeline.validate(config)
  data = stages.load_data(config)
  assert stages.data_spec(config, data).pad_mode == 'reflect'
  pipeline.run(config)
  rates = [r['learning_rate'] for r in checkpoint.read_metrics(stages.baseline_stage(config))]
  np.testing.assert_allclose(rates, [0.1, 0.02, 0.02, 0.004], rtol=1e-6)
  finetuned = checkpoint.read_result(stages.absolute(config.workdir) / 'finetune')
  assert (finetuned['batch_size'], checkpoint.read_result(
      stages.baseline_stage(config))['batch_size']) == (16, 32)


def test_mask_lottery_holds_removed_filters_at_zero_and_trains_the_rest(quick_config):
  from jaxprune import pipeline
  from jaxprune.pipeline import stages
  from jaxprune.train import checkpoint
  from flax import traverse_util
  config = quick_config(regime='lottery', lottery_style='mask', selection='layer')
  row = next(r for r in pipeline.run(config)['rows'] if r['stage'] == 'lottery')
  data = stages.load_data(config)
  pruned = stages.prune(config, stages.baseline(config, data), data).pruned
  stage, plan = stages.regime_plan(config, 'lottery', pruned, data)
  final = traverse_util.flatten_dict(checkpoint.load_final(stage, like=plan.variables)['params'])
  start = traverse_util.flatten_dict(plan.variables['params'])
  for group, layer, shift in (('conv1', 'conv1_conv', 'conv1_bn'),
                              ('conv2', 'conv2_conv', 'conv2_bn'), ('fc', 'fc_dense', 'fc_dense')):
    removed = pruned.masks[group] == 0
    kernel = final[(layer, 'kernel')]
    np.testing.assert_array_equal(kernel[..., removed], 0)
    moved = kernel[..., ~removed] != start[(layer, 'kernel')][..., ~removed]
    assert np.all(np.any(moved.reshape(-1, moved.shape[-1]), axis=0))
    # A removed channel's output is relu(beta); beta starts at 0, the ReLU's kink, and
    # gets no gradient there, so the channel emits zero as in the sliced lottery.
    np.testing.assert_array_equal(final[(shift, 'bias')][removed], 0)
  full = flops.count(pruned.structure)
  assert row['macs'] < full.macs and row['params'] < full.params
  assert row['macs'] == flops.count_masked(pruned.structure, plan.variables['weight_masks']).macs


def test_mask_lottery_refuses_channels_no_conv_filter_produces():
  pruned = pruned_to_half_the_macs('densenet10')
  with pytest.raises(ConfigError, match='lottery_style=slice'):
    regimes.filter_masks(pruned.structure, pruned.masks)
