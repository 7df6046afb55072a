"""The ImageNet models: torchvision's MACs and parameters, their groups, and pruning them.

Costs are read at 224x224 from the structure alone (a traced program, nothing computed);
the forward passes run on small images.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import models, summary
from jaxprune.errors import ConfigError
from jaxprune.prune import criteria, flops, program, shrink
from random_variables import random_like

IMAGENET = (224, 224, 3)
# torchvision's documented counts (the models' pages: num_params, and GFLOPS, which are
# multiply-accumulates of the convolutions and Dense layers at 224x224).
TORCHVISION = {
    'resnet18': (1.81e9, 11_689_512),
    'resnet34': (3.66e9, 21_797_672),
    'resnet50': (4.09e9, 25_557_032),
    'resnet101': (7.80e9, 44_549_160),
    'vgg11_bn': (7.61e9, 132_868_840),
    'vgg16_bn': (15.47e9, 138_365_992),
}


def structure(name, image_shape=IMAGENET, **options):
  return program.derive(models.build(name, num_classes=1000, **options), image_shape).structure


@pytest.mark.parametrize('name', sorted(TORCHVISION))
def test_macs_and_params_are_torchvisions_within_1_percent(name):
  cost = flops.count(structure(name))
  macs, params = TORCHVISION[name]
  assert abs(cost.macs - macs) / macs < 0.01
  assert abs(cost.params - params) / params < 0.01


def test_the_resnets_count_torchvisions_parameters_exactly():
  # The VGGs' convolutions have no bias (BN follows each): 4,224 fewer in VGG-16.
  for name in ('resnet18', 'resnet34', 'resnet50', 'resnet101'):
    assert flops.count(structure(name)).params == TORCHVISION[name][1]
  assert flops.count(structure('vgg16_bn')).params == TORCHVISION['vgg16_bn'][1] - 4224


def test_bottleneck_groups_inner_widths_prunable_streams_and_stem_not():
  struct = structure('resnet50')
  assert len(struct.prunable) == 2 * 16
  assert struct.prunable[:2] == ('stage1_block1_mid1', 'stage1_block1_mid2')
  assert struct.widths['stage3_block6_mid2'] == 256
  assert {g: struct.widths[g] for g in ('stem', 'stage1', 'stage2', 'stage3', 'stage4')} == {
      'stem': 64, 'stage1': 256, 'stage2': 512, 'stage3': 1024, 'stage4': 2048}
  assert not {'stem', 'stage1', 'stage2', 'stage3', 'stage4'} & set(struct.prunable)


def test_basic_block_groups_are_the_first_convs_and_the_stem_writes_stage1():
  struct = structure('resnet34')
  assert struct.prunable == tuple(f'stage{s}_block{b}' for s, n in enumerate((3, 4, 6, 3), 1)
                                  for b in range(1, n + 1))
  assert 'stem' not in struct.widths and struct.widths['stage1'] == 64


def test_vgg_groups_are_every_conv_and_both_hidden_dense_layers():
  struct = structure('vgg16_bn')
  assert struct.prunable[0] == 'conv1_1' and struct.prunable[-3:] == ('conv5_3', 'fc1', 'fc2')
  assert len(struct.prunable) == 15 and struct.widths['fc1'] == 4096


def test_summary_counts_imagenet2012_at_224_without_its_data():
  text = summary.format_summary(summary.summarize('resnet50', dataset='imagenet2012'))
  assert 'resnet50 at 224x224x3 (imagenet2012), 1000 classes' in text
  assert 'MACs 4.09G (4,089,184,256), params 25.56M (25,557,032)' in text


def test_summary_command_prints_resnet50_at_imagenet2012():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, '-m', 'jaxprune.summary', '--model=resnet50',
                         '--dataset=imagenet2012'], cwd=root, capture_output=True, text=True,
                        timeout=300, check=False)
  assert done.returncode == 0, done.stderr
  assert 'MACs 4.09G (4,089,184,256), params 25.56M (25,557,032)' in done.stdout


def test_summary_refuses_a_data_path_for_imagenet2012():
  with pytest.raises(ConfigError, match='data_path is for dataset=npz, not dataset=imagenet2012'):
    summary.summarize('resnet18', dataset='imagenet2012', data_path='x.npz')


def _shrunk_equals_masked(name, size, masks_of):
  """Shrinks `name` at size x size by `masks_of(structure)`: the model built at the new
  widths computes what the masked full model computes; returns (structure, new widths)."""
  model = models.build(name, num_classes=10)
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  prog = program.derive(model, x.shape[1:])
  variables = random_like(models.init_shapes(model, x.shape[1:]), seed=1)
  masks = masks_of(prog.structure)
  widths, small, _ = shrink.shrink(prog, variables, masks)
  pruned = models.build(name, num_classes=10, widths=widths)
  out = jax.jit(pruned.apply)(small, x)
  assert out.shape == (2, 10)
  np.testing.assert_allclose(out, prog.apply(variables, x, masks=masks), rtol=1e-4, atol=1e-4)
  return prog.structure, widths, small


def test_resnet18_shrunk_equals_masked_at_64x64():
  rng = np.random.default_rng(0)

  def half_of_every_group(struct):
    masks = {g: (rng.random(struct.widths[g]) < 0.5).astype(np.float32) for g in struct.prunable}
    for mask in masks.values():
      mask[0] = 1
    return masks
  _shrunk_equals_masked('resnet18', 64, half_of_every_group)


def test_pruning_a_resnet50_bottleneck_group_shrinks_its_convolutions_and_macs():
  keep = (np.arange(256) % 4 != 0).astype(np.float32)
  struct, widths, small = _shrunk_equals_masked('resnet50', 32,
                                                lambda _: {'stage3_block2_mid2': keep})
  assert widths == dict(struct.widths, stage3_block2_mid2=192)
  assert small['params']['stage3_block2_conv2']['kernel'].shape == (3, 3, 256, 192)
  assert small['params']['stage3_block2_conv3']['kernel'].shape == (1, 1, 192, 1024)
  assert small['batch_stats']['stage3_block2_bn2']['mean'].shape == (192,)
  # 64 channels of the 3x3's output (a 2x2 map at 32x32) and of the 1x1's input.
  assert flops.count(struct).macs - flops.count(struct, widths).macs == (
      64 * (3 * 3 * 256 + 1024) * 2 * 2)


def test_vgg_dropout_draws_new_masks_each_training_call_and_none_in_evaluation():
  model = models.build('vgg11_bn', num_classes=10, width_multiplier=1 / 16)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = models.init(model, jax.random.key(0), x.shape[1:])
  train = jax.jit(lambda v: model.apply(v, x, train=True, mutable=['batch_stats']))
  evaluate = jax.jit(lambda v: model.apply(v, x))
  key = variables['batch_stats']['dropout_key']
  first, state = train(variables)
  advanced = state['batch_stats']['dropout_key']
  assert not np.array_equal(key, advanced)
  with_advanced_key = {**variables, 'batch_stats': {**variables['batch_stats'],
                                                    'dropout_key': advanced}}
  second, _ = train(with_advanced_key)
  assert not np.allclose(first, second)
  np.testing.assert_array_equal(first, train(variables)[0])  # the same key, the same masks
  np.testing.assert_array_equal(evaluate(variables), evaluate(with_advanced_key))


def test_the_slimming_vgg11_has_prunable_bn_scales_in_its_classifier():
  model = models.build('vgg11_bn_fcbn', num_classes=10, width_multiplier=1 / 16,
                       bn_scale_init=0.5)
  prog = program.derive(model, (32, 32, 3))
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  assert 'dropout_key' not in variables['batch_stats']
  scores = criteria.score('bn_scale', prog, variables, None)
  np.testing.assert_array_equal(scores['fc2'], np.full(256, 0.5, np.float32))
  assert flops.count(structure('vgg11_bn_fcbn')).params == (
      flops.count(structure('vgg11_bn')).params + 2 * 2 * 4096)


def test_images_too_small_for_the_imagenet_models_are_a_config_error():
  for name, size in (('resnet18', 16), ('vgg16_bn', 16)):
    with pytest.raises(ConfigError, match='at least 32x32'):
      models.build(name).init(jax.random.key(0), jnp.zeros((1, size, size, 3)))


def test_the_cifar_shortcut_setting_is_refused_for_the_imagenet_resnets():
  with pytest.raises(ConfigError, match=r'CIFAR basic-block ResNets \(resnet8, .*not resnet18'):
    models.build('resnet18', resnet_shortcut='avgpool_detached')
