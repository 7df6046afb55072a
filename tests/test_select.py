"""Selection policies: scores -> masks, presets, the MACs target and their validation."""

import functools
import time

import numpy as np
import pytest

from jaxprune import models
from jaxprune.prune import flops, program, structure
from jaxprune.prune import select as sel
from jaxprune.errors import ConfigError


@functools.lru_cache(maxsize=None)
def derived(name):
  return program.derive(models.build(name)).structure


@pytest.fixture
def tiny():
  return derived('tiny')  # conv1: 8, conv2: 16, fc: 16


@pytest.fixture
def resnet56():
  return derived('resnet56')


def random_scores(struct, seed=0):
  rng = np.random.default_rng(seed)
  return {g: rng.normal(size=struct.widths[g]) for g in struct.prunable}


def kept(masks):
  return {g: int(m.sum()) for g, m in masks.items()}


def widths_after(struct, masks):
  widths = dict(struct.widths)
  widths.update(kept(masks))
  return widths


def widths_only(name):
  """A Structure carrying only a model's default widths: all presets need."""
  model = models.build(name)
  return structure.Structure(widths=models.widths_of(model), prunable=model.prunable_groups(),
                             axes={}, shapes={}, positions={})


# --- layer / global / slimming ---------------------------------------------------------------


@pytest.mark.parametrize('name,arg', [('layer', {'ratio': 0.3}), ('macs', {'target_macs': 0.4}),
                                      ('global', {'ratio': 0.6})])
def test_round_to_rounds_kept_channels_up_keeping_the_next_highest_scores(tiny, name, arg):
  scores = random_scores(tiny, seed=3)
  exact = sel.select(name, tiny, scores, **arg)
  rounded = sel.select(name, tiny, scores, round_to=4, **arg)
  for g in tiny.prunable:
    k = int(exact[g].sum())
    assert int(rounded[g].sum()) == min(tiny.widths[g], -(-k // 4) * 4), g
    assert np.all(rounded[g] >= exact[g])   # a superset: only the next-best are added
    if 0 < rounded[g].sum() < tiny.widths[g]:
      assert scores[g][rounded[g] == 1].min() > scores[g][rounded[g] == 0].max()


def test_layer_keeps_int_c_times_one_minus_ratio_highest_scores(tiny):
  scores = random_scores(tiny)
  masks = sel.select('layer', tiny, scores, ratio=0.3)
  assert kept(masks) == {'conv1': int(8 * 0.7), 'conv2': int(16 * 0.7), 'fc': int(16 * 0.7)}
  for g, m in masks.items():
    assert m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
    assert scores[g][m == 1].min() > scores[g][m == 0].max()


def test_global_removes_the_lowest_fraction_of_all_prunable_channels(tiny):
  scores = random_scores(tiny)
  masks = sel.select('global', tiny, scores, ratio=0.25)
  assert sum(m.size - m.sum() for m in masks.values()) == int(0.25 * 40)
  kept_scores = np.concatenate([scores[g][masks[g] == 1] for g in masks])
  removed = np.concatenate([scores[g][masks[g] == 0] for g in masks])
  assert removed.max() < kept_scores.min()


def test_global_l2_is_global_on_per_layer_l2_normalised_scores(tiny):
  scores = {g: np.abs(s) for g, s in random_scores(tiny).items()}
  scores['conv1'] *= 1e-3  # a much smaller scale: plain global ranking strips the layer
  raw = sel.select('global', tiny, scores, ratio=0.3)
  assert kept(raw)['conv1'] == 1
  normalised = {g: s / np.linalg.norm(s) for g, s in scores.items()}
  expected = sel.select('global', tiny, normalised, ratio=0.3)
  got = sel.select('global_l2', tiny, scores, ratio=0.3)
  assert all(np.array_equal(got[g], expected[g]) for g in got)
  assert kept(got)['conv1'] > 1


def test_slimming_keeps_magnitudes_strictly_above_the_global_percentile(tiny):
  scores = random_scores(tiny, seed=3)
  percent = 0.4
  pooled = np.sort(np.abs(np.concatenate([scores[g] for g in tiny.prunable])))
  threshold = pooled[int(len(pooled) * percent)]
  masks = sel.select('slimming', tiny, scores, ratio=percent)
  for g in tiny.prunable:
    np.testing.assert_array_equal(masks[g], (np.abs(scores[g]) > threshold).astype(np.float32))


def test_slimming_never_empties_a_layer(tiny):
  scores = random_scores(tiny)
  scores['conv1'] = np.linspace(1e-6, 2e-6, 8)
  masks = sel.select('slimming', tiny, scores, ratio=0.5, min_channels=3)
  assert kept(masks)['conv1'] == 3
  assert masks['conv1'][-3:].tolist() == [1, 1, 1]  # its three largest


def test_ties_remove_earlier_group_and_channel_first(tiny):
  scores = {g: np.ones(tiny.widths[g]) for g in tiny.prunable}
  masks = sel.select('global', tiny, scores, ratio=0.1)  # 4 channels
  assert masks['conv1'].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


# --- min_channels and current masks, for every policy -----------------------------------------

EXTREME = {
    'layer': {'ratio': 0.99}, 'slimming': {'ratio': 0.99}, 'global': {'ratio': 0.8},
    'global_l2': {'ratio': 0.8}, 'macs': {'target_macs': 0.13}, 'macs_l2': {'target_macs': 0.13},
    'random_widths': {'target_macs': 0.13},
}


@pytest.mark.parametrize('name', sorted(EXTREME))
def test_every_policy_keeps_min_channels_per_group(tiny, name):
  masks = sel.select(name, tiny, random_scores(tiny), min_channels=2, **EXTREME[name])
  assert min(kept(masks).values()) >= 2


@pytest.mark.parametrize('name', sorted(EXTREME))
def test_already_removed_channels_stay_removed(tiny, name):
  scores = random_scores(tiny)
  # Remove the highest-scoring channels, which every policy would otherwise keep.
  current = {g: (s < np.sort(s)[-2]).astype(np.float32) for g, s in scores.items()}
  masks = sel.select(name, tiny, scores, current=current, **EXTREME[name])
  for g in masks:
    assert not np.any(masks[g][current[g] == 0])


@pytest.mark.parametrize('name,arg', [('layer', {'ratio': 0.5}), ('global', {'ratio': 0.5}),
                                      ('slimming', {'ratio': 0.5}),
                                      ('macs', {'target_macs': 0.4})])
def test_selecting_again_with_the_result_as_current_changes_nothing(tiny, name, arg):
  scores = random_scores(tiny)
  first = sel.select(name, tiny, scores, **arg)
  again = sel.select(name, tiny, scores, current=first, **arg)
  assert all(np.array_equal(first[g], again[g]) for g in first)


@functools.lru_cache(maxsize=None)
def vgg11_half():
  return program.derive(models.build('vgg11', width_multiplier=0.5)).structure


@pytest.mark.parametrize('target', [0.5, 0.25])
def test_random_widths_profiles_are_reproducible_distinct_and_within_one_percent(target):
  struct = vgg11_half()
  full = flops.count(struct).macs
  profiles = []
  for profile in range(3):
    masks = sel.select('random_widths', struct, random_scores(struct), target_macs=target,
                       width_profile=profile)
    macs = flops.count(struct, widths_after(struct, masks)).macs
    assert (target - 0.01) * full <= macs <= target * full
    # The widths are the profile's: other scores keep as many channels per group.
    again = sel.select('random_widths', struct, random_scores(struct, seed=7),
                       target_macs=target, width_profile=profile)
    assert kept(again) == kept(masks)
    profiles.append(tuple(kept(masks).values()))
  assert len(set(profiles)) == 3


def test_random_widths_keeps_the_highest_scores_within_each_width(tiny):
  scores = random_scores(tiny)
  masks = sel.select('random_widths', tiny, scores, target_macs=0.4, width_profile=1)
  narrowed = [g for g, m in masks.items() if 0 < m.sum() < m.size]
  assert narrowed
  for g in narrowed:
    assert scores[g][masks[g] == 1].min() > scores[g][masks[g] == 0].max()


def test_random_channels_keep_the_counts_and_draw_other_channels(resnet56):
  masks = sel.select('macs_l2', resnet56, random_scores(resnet56), target_macs=0.5)
  drawn = sel.random_channels(masks, np.random.default_rng(0))
  assert kept(drawn) == kept(masks)
  assert any(not np.array_equal(drawn[g], masks[g]) for g in masks)
  again = sel.random_channels(masks, np.random.default_rng(0))
  assert all(np.array_equal(drawn[g], again[g]) for g in drawn)


def test_ratio_counts_channels_already_removed(tiny):
  scores = random_scores(tiny)
  current = {'conv2': np.r_[np.zeros(6), np.ones(10)]}
  masks = sel.select('global', tiny, scores, ratio=0.25, current=current)
  assert sum(m.size - m.sum() for m in masks.values()) == int(0.25 * 40)


# --- MACs target ------------------------------------------------------------------------------


def naive_macs_selection(struct, scores, target, min_channels=1):
  """Reference: sort all channels once, remove one at a time, recount MACs every time."""
  entries = sorted((s, gi, c) for gi, g in enumerate(struct.prunable)
                   for c, s in enumerate(scores[g]))
  masks = {g: np.ones(struct.widths[g], np.float32) for g in struct.prunable}
  budget = target * flops.count(struct).macs
  for _, gi, c in entries:
    if flops.count(struct, widths_after(struct, masks)).macs <= budget:
      break
    g = struct.prunable[gi]
    if masks[g].sum() > min_channels:
      masks[g][c] = 0
  return masks


@pytest.mark.parametrize('target', [0.9, 0.5, 0.2])
def test_macs_policy_matches_a_full_recount_after_every_channel(tiny, target):
  scores = random_scores(tiny)
  got = sel.select('macs', tiny, scores, target_macs=target)
  expected = naive_macs_selection(tiny, scores, target)
  assert all(np.array_equal(got[g], expected[g]) for g in got)
  assert flops.count(tiny, widths_after(tiny, got)).macs <= target * flops.count(tiny).macs


def test_macs_policy_handles_thousands_of_channels_quickly():
  vgg16 = derived('vgg16')  # 4224 prunable channels
  scores = random_scores(vgg16)
  start = time.perf_counter()
  masks = sel.select('macs_l2', vgg16, scores, target_macs=0.1, flops_penalty=1e-3)
  assert time.perf_counter() - start < 2.0
  macs = flops.count(vgg16, widths_after(vgg16, masks)).macs
  assert macs <= 0.1 * flops.count(vgg16).macs


def test_macs_target_below_the_min_channels_floor_names_the_floor(tiny):
  floor = flops.count(tiny, {'conv1': 1, 'conv2': 1, 'fc': 1}).macs
  with pytest.raises(ConfigError, match=f"target_macs=0.001 .*{floor:,} MACs") as info:
    sel.select('macs', tiny, random_scores(tiny), target_macs=0.001)
  assert info.value.settings == ('target_macs', 'min_channels')


# --- FLOPs penalty and iterative removal ------------------------------------------------------


def test_flops_penalty_removes_the_costliest_channel_among_equal_scores(tiny):
  scores = {g: np.ones(tiny.widths[g]) for g in tiny.prunable}
  costliest = max(tiny.prunable, key=lambda g: flops.per_group(tiny)[g].macs)
  masks = sel.remove_lowest(tiny, scores, None, 1, flops_penalty=sel.DEFAULT_FLOPS_PENALTY)
  assert {g for g, m in masks.items() if m.sum() < m.size} == {costliest}


def test_absolute_flops_cost_subtracts_lambda_times_the_macs_one_channel_costs(tiny):
  scores = random_scores(tiny)
  penalised = sel._penalised(tiny, scores, sel._check_live(tiny, None), 1e-3, 'absolute')
  full = flops.count(tiny).macs
  for g in tiny.prunable:
    saved = full - flops.count(tiny, {**tiny.widths, g: tiny.widths[g] - 1}).macs
    np.testing.assert_allclose(penalised[g], scores[g] - 1e-3 * saved)


def test_remove_lowest_removes_exactly_k_more_of_the_live_channels(tiny):
  scores = random_scores(tiny)
  current = {'fc': (scores['fc'] > np.sort(scores['fc'])[2]).astype(np.float32)}
  masks = sel.remove_lowest(tiny, scores, current, 5)
  assert sum(m.size - m.sum() for m in masks.values()) == 3 + 5
  assert not np.any(masks['fc'][current['fc'] == 0])
  live_removed = [scores[g][(masks[g] == 0) & (current.get(g, np.ones_like(masks[g])) == 1)]
                  for g in masks]
  live_kept = [scores[g][masks[g] == 1] for g in masks]
  assert np.concatenate(live_removed).max() < np.concatenate(live_kept).min()


def test_remove_lowest_past_the_min_channels_floor_is_a_config_error(tiny):
  with pytest.raises(ConfigError, match='only 37 removable') as info:
    sel.remove_lowest(tiny, random_scores(tiny), None, 38)
  assert info.value.settings == ('min_channels',)


def test_remove_lowest_of_a_negative_count_is_a_bug_not_a_config_error(tiny):
  with pytest.raises(ValueError, match='non-negative') as info:
    sel.remove_lowest(tiny, random_scores(tiny), None, -1)
  assert not isinstance(info.value, ConfigError)


# --- presets ----------------------------------------------------------------------------------


@pytest.mark.parametrize('model', ['vgg16', 'vgg16_mlp'])
def test_vgg16_a_halves_conv1_1_and_the_last_six_convs(model):
  widths = sel.preset_widths('vgg16_a', widths_only(model))
  expected = models.widths_of(models.build(model))
  expected.update({'conv1_1': 32, **{f'conv{s}_{i}': 256 for s in (4, 5) for i in (1, 2, 3)}})
  assert widths == expected


def li_resnet_widths(depth, stage_ratios, skip):
  """Expected widths from the REFERENCES rules, by walking Li et al.'s conv numbers."""
  n = (depth - 2) // 6
  boundaries = {56: (18, 36), 110: (36, 72)}[depth]
  channels = (16, 32, 64)
  widths = {f'stage{s}': channels[s - 1] for s in (1, 2, 3)}
  block_in_stage = {1: 0, 2: 0, 3: 0}
  for conv in range(2, 2 + 2 * 3 * n, 2):  # the even numbers: each block's first conv
    stage = 1 if conv <= boundaries[0] else 2 if conv <= boundaries[1] else 3
    block_in_stage[stage] += 1
    c = channels[stage - 1]
    keep = c if conv in skip else int(c * (1 - stage_ratios[stage - 1]))
    widths[f'stage{stage}_block{block_in_stage[stage]}'] = keep
  return widths


@pytest.mark.parametrize('preset,depth,ratios,skip', [
    ('resnet56_a', 56, (0.1, 0.1, 0.1), {16, 20, 38, 54}),
    ('resnet56_b', 56, (0.6, 0.3, 0.1), {16, 18, 20, 34, 38, 54}),
    ('resnet110_a', 110, (0.5, 0.0, 0.0), {36}),
    ('resnet110_b', 110, (0.5, 0.4, 0.3), {36, 38, 74}),
])
def test_resnet_presets_give_li_et_al_widths(preset, depth, ratios, skip):
  assert sel.preset_widths(preset, widths_only(f'resnet{depth}')) == li_resnet_widths(
      depth, ratios, skip)


def test_resnet56_a_spot_widths():
  widths = sel.preset_widths('resnet56_a', widths_only('resnet56'))
  assert widths['stage1_block1'] == 14 and widths['stage1_block8'] == 16  # conv 16 skipped
  assert widths['stage2_block1'] == 32 and widths['stage2_block2'] == 28  # conv 20 skipped
  assert widths['stage3_block1'] == 64 and widths['stage3_block9'] == 64  # convs 38, 54
  assert widths['stage3_block5'] == 57


@pytest.mark.parametrize('model,preset,macs', [
    ('vgg16', 'vgg16_a', 2.06e8), ('resnet56', 'resnet56_a', 1.12e8),
    ('resnet56', 'resnet56_b', 9.09e7),
    pytest.param('resnet110', 'resnet110_a', 2.13e8, marks=pytest.mark.slow),
    pytest.param('resnet110', 'resnet110_b', 1.55e8, marks=pytest.mark.slow)])
def test_preset_macs_match_li_et_al_table_1(model, preset, macs):
  # FLOPs of the pruned CIFAR models as reported in Li et al. 2017, Table 1 (3 digits).
  struct = derived(model)
  assert flops.count(struct, sel.preset_widths(preset, struct)).macs == pytest.approx(
      macs, rel=5e-3)


def test_preset_selection_keeps_the_highest_scores_in_each_layer(resnet56):
  scores = random_scores(resnet56)
  masks = sel.select('preset', resnet56, scores, preset='resnet56_b')
  expected = sel.preset_widths('resnet56_b', resnet56)
  assert kept(masks) == {g: expected[g] for g in resnet56.prunable}
  for g, m in masks.items():
    if m.sum() < m.size:
      assert scores[g][m == 1].min() > scores[g][m == 0].max()


@pytest.mark.parametrize('preset,model', [('resnet56_a', 'resnet110'), ('vgg16_a', 'resnet56'),
                                          ('resnet110_b', 'vgg16_mlp')])
def test_preset_for_the_wrong_model_names_both(preset, model):
  with pytest.raises(ConfigError, match=f"preset={preset} is for .*not for {model}") as info:
    sel.preset_widths(preset, widths_only(model))
  assert info.value.settings == ('preset',)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize('ratio', [-0.1, 1.0, 1.5])
def test_ratio_outside_zero_one_is_a_config_error(tiny, ratio):
  with pytest.raises(ConfigError, match=r'prune_ratio=.* is outside \[0, 1\)') as info:
    sel.select('global', tiny, random_scores(tiny), ratio=ratio)
  assert info.value.settings == ('prune_ratio',)


def test_unknown_selection_lists_the_registry(tiny):
  with pytest.raises(ConfigError, match='unknown selection .*global_l2') as info:
    sel.select('globl', tiny, random_scores(tiny), ratio=0.5)
  assert info.value.settings == ('selection',)


def test_scores_missing_a_group_are_a_bug_not_a_config_error(tiny):
  scores = random_scores(tiny)
  del scores['fc']
  with pytest.raises(KeyError, match="missing .*'fc'"):
    sel.select('layer', tiny, scores, ratio=0.5)


@pytest.mark.parametrize('group,value,message', [
    ('conv1', np.ones(7), r"'conv1' have shape \(7,\); expected \(8,\)"),
    ('conv1', np.full(8, np.nan), 'NaN'),
    ('conv9', np.ones(3), r"\['conv9'\] that are not prunable"),
])
def test_wrong_scores_from_code_are_value_errors_not_config_errors(tiny, group, value, message):
  scores = {**random_scores(tiny), group: value}
  with pytest.raises(ValueError, match=message) as info:
    sel.select('layer', tiny, scores, ratio=0.5)
  assert not isinstance(info.value, ConfigError)


def test_wrong_current_masks_are_value_errors_not_config_errors(tiny):
  with pytest.raises(ValueError, match='removes all 8 channels') as info:
    sel.select('layer', tiny, random_scores(tiny), ratio=0.5, current={'conv1': np.zeros(8)})
  assert not isinstance(info.value, ConfigError)


def test_global_ratio_beyond_the_min_channels_floor_is_a_config_error(tiny):
  with pytest.raises(ConfigError, match='prune_ratio=0.95 removes 38 .*at most 37') as info:
    sel.select('global', tiny, random_scores(tiny), ratio=0.95)
  assert info.value.settings == ('prune_ratio', 'min_channels')


@pytest.mark.parametrize('name,kwargs,message,settings', [
    ('macs', {'ratio': 0.5}, 'selection=macs takes target_macs, not prune_ratio',
     ('selection', 'target_macs', 'prune_ratio')),
    ('layer', {'ratio': 0.5, 'flops_penalty': 1e-3}, 'takes no flops_penalty',
     ('selection', 'flops_penalty')),
    ('global', {'ratio': 0.5, 'flops_penalty': -1}, 'flops_penalty must be at least 0',
     ('flops_penalty',)),
    ('preset', {}, 'selection=preset needs preset', ('selection', 'preset')),
    ('preset', {'preset': 'resnet56_c'}, "unknown preset 'resnet56_c'", ('preset',)),
    ('global', {}, 'selection=global needs prune_ratio', ('selection', 'prune_ratio')),
    ('macs', {'target_macs': 1.5}, r'target_macs=1.5 is outside \(0, 1\]', ('target_macs',)),
    ('layer', {'ratio': 0.5, 'min_channels': 0}, 'at least 1', ('min_channels',)),
    ('layer', {'ratio': 0.5, 'round_to': 0}, 'round_to must be an integer of at least 1, got 0',
     ('round_to',)),
    ('random_widths', {'target_macs': 0.5, 'width_profile': -1},
     'width_profile must be a whole number >= 0, got -1', ('width_profile',)),
    ('random_widths', {'ratio': 0.5}, 'selection=random_widths takes target_macs',
     ('selection', 'target_macs', 'prune_ratio')),
])
def test_misused_arguments_are_config_errors_naming_their_settings(tiny, name, kwargs, message,
                                                                   settings):
  with pytest.raises(ConfigError, match=message) as info:
    sel.select(name, tiny, random_scores(tiny), **kwargs)
  assert info.value.settings == settings
  assert '--' not in str(info.value)
