"""experiments/imagenet.py: the dry run, and the recipe values of experiments/README.md's
"ImageNet recipes" table in the planned configs."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common, imagenet  # noqa: E402
from jaxprune import models  # noqa: E402
from jaxprune.pipeline import regimes  # noqa: E402
from jaxprune.prune import flops, program, select  # noqa: E402

# Dry runs read no data, and plan the same runs on any dataset.
STAND_IN = ('--dataset=npz', '--data_path=imagenet.npz')


def dry_run(tmp_path, *flags):
  return common.main(imagenet.EXPERIMENT, imagenet.plan, extra_flags=imagenet.extra_flags,
                     argv=['--scale=full', f'--root={tmp_path}', '--dry_run', *flags],
                     scales=imagenet.SCALES)


def one_line_error(capsys, tmp_path, *flags) -> str:
  with pytest.raises(SystemExit) as stopped:
    dry_run(tmp_path, *flags)
  assert stopped.value.code == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  return lines[0]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  return {run.name: run for run in dry_run(tmp_path_factory.mktemp('plan'), *STAND_IN)}


def test_dry_run_prints_every_planned_run_and_writes_nothing(tmp_path, capsys):
  planned = dry_run(tmp_path, *STAND_IN)
  out = capsys.readouterr().out
  assert f'imagenet at scale full: {len(planned)} runs' in out
  for run in planned:
    assert run.name in out
  assert 'batch 256, lr 0.1, wd 0.0001, lr schedule step x0.1 at epochs 30,60' in out
  assert not list(tmp_path.iterdir())


def test_the_recipes_train_on_imagenet2012(tmp_path):
  assert {run.config.dataset for run in dry_run(tmp_path)} == {'imagenet2012'}
  assert not list(tmp_path.iterdir())


def test_every_recipe_and_regime_is_planned_once_with_seed_0(runs):
  per_method = {}
  for run in runs.values():
    per_method.setdefault(run.labels['method'], []).append(run.config.regime)
    assert run.config.seed == 0
  assert per_method == {'l1': ['finetune', 'scratch', 'scratch_b'] * 2,
                        'slimming': ['finetune', 'scratch', 'scratch_b'],
                        'thinet': ['scratch', 'scratch_b'] * 3,
                        'weight': ['finetune', 'scratch', 'scratch_b'] * 4,
                        'taylor': ['finetune'] * 8}


def test_every_baseline_is_r_s_from_scratch_recipe(runs):
  for run in runs.values():
    c = run.config
    assert (c.epochs, c.batch_size, c.lr, c.lr_schedule, c.lr_decay_epochs, c.lr_decay_factor,
            c.weight_decay) == (90, 256, 0.1, 'step', '30,60', 0.1, 1e-4)
  baselines = {run.config.model: run.config.baseline_dir for run in runs.values()}
  assert len(set(baselines.values())) == 5  # thinet, weight and taylor share ResNet-50's


def test_l1_resnet34_a_and_b_are_r_s_widths_and_budgets(runs):
  struct = program.derive(models.build('resnet34', num_classes=1000), (224, 224, 3)).structure
  scores = {g: np.arange(struct.widths[g], dtype=np.float32) for g in struct.prunable}
  full = flops.count(struct).macs
  # [R]'s prune.py: the widths the skipped convs leave, and the MACs they give.
  expected = {'A': ((44, 89, 179), 3_100_184_576), 'B': ((32, 51, 153), 2_782_269_440)}
  for tag, (stage_widths, macs) in expected.items():
    c = runs[f'l1/resnet34_{tag}/s0/scratch_b'].config
    assert (c.criterion, c.selection, c.preset, c.scratch_b_cap) == (
        'l1', 'preset', f'resnet34_{tag.lower()}', 2.0)
    assert (c.finetune_epochs, c.finetune_lr) == (20, 1e-3)
    masks = select.select(c.selection, struct, scores, preset=c.preset)
    widths = {**struct.widths, **{g: int(m.sum()) for g, m in masks.items()}}
    skipped = ('stage1_block1', 'stage2_block1', 'stage2_block4', 'stage3_block1',
               'stage3_block6', 'stage4_block1', 'stage4_block2', 'stage4_block3')
    for s, width in enumerate(stage_widths, 1):
      assert {widths[g] for g in struct.prunable if g.startswith(f'stage{s}_block')
              and g not in skipped} == {width}
    assert all(widths[g] == struct.widths[g] for g in skipped)
    assert flops.count(struct, widths).macs == macs
    assert regimes.scratch_b_epochs(c.epochs, full, macs, c.scratch_b_cap) == int(
        90 * full / macs)


def test_network_slimming_is_r_s_vgg11_recipe(runs):
  c = runs['slimming/vgg11_bn_fcbn_0.5/s0/finetune'].config
  assert (c.model, c.bn_scale_init, c.dense_init, c.bn_l1) == (
      'vgg11_bn_fcbn', 0.5, 'normal_0.01', 1e-5)
  assert (c.criterion, c.selection, c.prune_ratio) == ('bn_scale', 'slimming', 0.5)
  assert (c.finetune_epochs, c.finetune_lr) == (5, 1e-3)
  assert runs['slimming/vgg11_bn_fcbn_0.5/s0/scratch_b'].config.scratch_b_cap is None


def test_thinet_widths_and_scratch_b_epochs_are_r_s(runs):
  struct = program.derive(models.build('resnet50', num_classes=1000), (224, 224, 3)).structure
  scores = {g: np.arange(struct.widths[g], dtype=np.float32) for g in struct.prunable}
  full = flops.count(struct).macs
  # [R]'s thinetresnet.py widths per stage; its README's scratch-B epochs.
  expected = {30: ((19, 38, 76, 153), 180), 50: ((32, 64, 128, 256), 180),
              70: ((44, 89, 179, 358), 141)}
  for kept, (stage_widths, epochs) in expected.items():
    c = runs[f'thinet/resnet50_thinet{kept}/s0/scratch_b'].config
    assert (c.criterion, c.selection, c.scratch_b_cap) == ('l1', 'layer', 2.0)
    masks = select.select(c.selection, struct, scores, ratio=c.prune_ratio)
    widths = {**struct.widths, **{g: int(m.sum()) for g, m in masks.items()}}
    for s, width in enumerate(stage_widths, 1):
      assert {widths[g] for g in struct.prunable if g.startswith(f'stage{s}_')} == {width}
    pruned = flops.count(struct, widths).macs
    assert regimes.scratch_b_epochs(c.epochs, full, pruned, c.scratch_b_cap) == epochs


def test_weight_level_is_r_s_recipe(runs):
  for model in ('vgg16_bn', 'resnet50'):
    for ratio in (0.3, 0.6):
      c = runs[f'weight/{model}_{ratio}/s0/finetune'].config
      assert (c.granularity, c.criterion, c.selection, c.prune_ratio) == (
          'weight', 'l1', 'global', ratio)
      assert (c.finetune_epochs, c.finetune_lr) == (10, 1e-3)
      assert c.dense_init == ('normal_0.01' if model == 'vgg16_bn' else 'lecun_normal')
      assert runs[f'weight/{model}_{ratio}/s0/scratch_b'].config.scratch_b_cap is None


def test_taylor_removes_m_s_fraction_of_gates_100_every_30_steps(runs):
  # ResNet-50: 7,552 inner channels and 3,840 stream channels; ResNet-101: 16,256 and 3,840.
  assert imagenet.taylor_gates('resnet50') == 11392
  assert imagenet.taylor_gates('resnet101') == 20096
  for model, budgets in imagenet.TAYLOR.items():
    for kept, removed in budgets:
      c = runs[f'taylor/{model}_{kept}pct/s0/finetune'].config
      assert (c.criterion, c.selection, c.schedule, c.prune_every, c.prune_step) == (
          'taylor_fo', 'global', 'iterative', 30, 100)
      assert c.prune_ratio == pytest.approx(removed / imagenet.taylor_gates(model))
      assert (c.finetune_lr, c.finetune_epochs, c.batch_size) == (1e-3, 24, 256)
  assert imagenet.TAYLOR['resnet50'][2] == (72, 3200)


def test_the_command_line_overrides_a_recipe_value(runs, tmp_path):
  planned = dry_run(tmp_path, *STAND_IN, '--methods=weight', '--finetune_epochs=2',
                    '--seeds=0,1')
  assert {run.config.finetune_epochs for run in planned} == {2}
  assert {run.config.seed for run in planned} == {0, 1}
  assert {run.labels['method'] for run in planned} == {'weight'}


@pytest.mark.parametrize('flags, sentence', [
    (('--methods=l2',), "error: --methods 'l2' must be one or more of l1, slimming, thinet, "
                        'weight, taylor, comma-separated.'),
    (('--model=resnet18',), 'error: --model=resnet18: every ImageNet recipe names the network '
                            'it prunes; choose recipes with --methods.'),
])
def test_a_bad_value_stops_with_one_sentence(tmp_path, capsys, flags, sentence):
  assert one_line_error(capsys, tmp_path, *STAND_IN, *flags) == sentence


@pytest.mark.parametrize('scale, sentence', [
    ([], 'error: flag --scale=None: Flag --scale must have a value other than None.'),
    (['--scale=mini'], 'error: flag --scale=mini: value should be one of <full>.'),
])
def test_the_scale_must_be_full(tmp_path, capsys, scale, sentence):
  with pytest.raises(SystemExit) as stopped:
    common.main(imagenet.EXPERIMENT, imagenet.plan, extra_flags=imagenet.extra_flags,
                argv=[*scale, f'--root={tmp_path}', '--dry_run', *STAND_IN],
                scales=imagenet.SCALES)
  assert stopped.value.code == 1
  assert capsys.readouterr().err == sentence + '\n'
  assert list(tmp_path.iterdir()) == []
