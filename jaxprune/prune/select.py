"""Selection policies: importance scores + a policy -> masks saying which channels to keep.

Scores are `{group: (C,) array}`, higher = more important, for every prunable group of a
`Structure`. `select(name, structure, scores, ...)` returns `{group: (C,) float32 numpy
array}` of 0/1 (1 = keep) for every prunable group. `SELECTIONS` is the registry keyed by
the names the `selection` setting accepts:

  layer      each group keeps its int(C * (1 - ratio)) highest-scoring channels.
  global     all channels ranked together; the lowest int(ratio * total) are removed
             (total = prunable channels of the structure).
  global_l2  `global` after per-layer L2 normalisation of the scores [M].
  slimming   network slimming: |scores| of all groups sorted together, threshold = the
             value at position int(total * ratio), keep channels strictly above it.
  macs       remove the globally lowest channels one at a time until the MACs are at most
             `target_macs` times the structure's MACs.
  macs_l2    `macs` after per-layer L2 normalisation.
  preset     Li et al.'s L1-norm presets (`PRESETS`): per-group ratios, ranked per layer.
  random_widths
             a random width profile at `target_macs` (`sampled_widths`, seeded by
             `width_profile`); the scores only pick the channels each group keeps.

Rules shared by every policy:
  * Every group keeps at least `min_channels` live channels (all if it has fewer);
    `layer`, `slimming` and `preset` quietly keep more where their rule would go below
    (network slimming's reference code lacks this guard), `global` and `macs` raise a
    ConfigError when their count or target cannot be met.
  * `current` masks (0 = already removed) are respected: removed channels stay removed
    and count towards `ratio`, which always refers to the structure's full widths, so
    selecting again with the result as `current` returns the same masks.
  * Ties: among equal scores, channels earlier in (group order, channel index) go first.
  * `round_to` = N > 1: each group's kept count is rounded up to a multiple of N (at most
    its live channels) with its next highest-scoring channels: a convolution with 63
    output channels can be slower than one with 64, so a rounded network runs faster
    though its MACs end slightly above a `target_macs`.

FLOPs-aware penalty [M] (`flops_penalty` = lambda; `global*`, `macs*`, `remove_lowest`):
channels are ranked by `score - lambda * m_g / mean_m`, with `m_g` the MACs removed by
taking one channel out of group g and `mean_m` the mean of `m` over all live prunable
channels, both at the widths the selection starts from and after L2 normalisation. The
penalty is thus dimensionless (1 = the average channel's cost) and independent of image
size and model; `DEFAULT_FLOPS_PENALTY` is [M]'s lambda. `flops_cost='absolute'`
(`FLOPS_COSTS`) drops the division, the unnormalised form of [M]'s public code
(NVlabs/Taylor_pruning); its cost counts only a layer's own convolution, while `m_g`
counts every MAC the channel takes part in (its producer's output, its consumers' input).
"""

import collections
import dataclasses
import functools
import math
from typing import Callable, Mapping

import numpy as np

from jaxprune.errors import ConfigError, choose
from jaxprune.prune import flops, shrink
from jaxprune.prune.structure import Structure

DEFAULT_FLOPS_PENALTY = 1e-3
# What the FLOPs penalty multiplies (module docstring): the keys the `flops_cost` setting takes.
FLOPS_COSTS = {
    'relative': "a channel's MACs over the mean live channel's (dimensionless)",
    'absolute': "a channel's MACs as a count, as [M]'s public code (unnormalised)",
}

# A sampled width profile draws every group's keep fraction from U(PROFILE_LOW, 1).
PROFILE_LOW = 0.1
# Which channels a group keeps once its width is chosen; random ones (`random_channels`)
# tell a criterion's channels from the widths it chose.
KEPT_CHANNELS = {
    'criterion': "each group's highest-scoring channels",
    'random': "as many channels per group, drawn at random (the run's seed)",
}

Scores = Mapping[str, np.ndarray]
Masks = dict[str, np.ndarray]


# Presets (Li et al. 2017, as used by [R]).


@dataclasses.dataclass(frozen=True)
class Preset:
  """Per-group pruning ratios for one model family; each group keeps int(C * (1 - ratio))."""
  models: tuple[str, ...]  # registry names of the models it applies to (same groups)
  ratios: Mapping[str, float]  # {group: fraction removed}; groups not named keep all


def _li_resnet(model: str, blocks: tuple[int, ...], stage_ratios: tuple[float, ...],
               skip: tuple[int, ...]) -> Preset:
  """A preset pruning the first conv of every block with its stage's ratio. `blocks` are the
  basic blocks per stage; in Li et al.'s numbering convs count from 1 (the stem), block j
  (0-based over the network) has first conv 2 + 2j, and convs in `skip` keep all channels."""
  ratios, j = {}, 0
  for s, (count, ratio) in enumerate(zip(blocks, stage_ratios), start=1):
    for b in range(1, count + 1):
      if 2 + 2 * j not in skip and ratio > 0:
        ratios[f'stage{s}_block{b}'] = ratio
      j += 1
  return Preset(models=(model,), ratios=ratios)


# [R]'s ImageNet L1-norm code (imagenet/l1-norm-pruning/prune.py) skips these convs.
_RESNET34_SKIP = (2, 8, 14, 16, 26, 28, 30, 32)
PRESETS: dict[str, Preset] = {
    'vgg16_a': Preset(  # conv1_1 keeps 32 of 64, conv4_1..conv5_3 keep 256 of 512
        models=('vgg16', 'vgg16_mlp'),
        ratios={'conv1_1': 0.5, **{f'conv{s}_{i}': 0.5 for s in (4, 5) for i in (1, 2, 3)}}),
    'resnet56_a': _li_resnet('resnet56', (9, 9, 9), (0.1, 0.1, 0.1), (16, 20, 38, 54)),
    'resnet56_b': _li_resnet('resnet56', (9, 9, 9), (0.6, 0.3, 0.1), (16, 18, 20, 34, 38, 54)),
    'resnet110_a': _li_resnet('resnet110', (18, 18, 18), (0.5, 0, 0), (36,)),
    'resnet110_b': _li_resnet('resnet110', (18, 18, 18), (0.5, 0.4, 0.3), (36, 38, 74)),
    'resnet34_a': _li_resnet('resnet34', (3, 4, 6, 3), (0.3, 0.3, 0.3, 0), _RESNET34_SKIP),
    'resnet34_b': _li_resnet('resnet34', (3, 4, 6, 3), (0.5, 0.6, 0.4, 0), _RESNET34_SKIP),
}


@functools.lru_cache(maxsize=None)
def _group_names(model_name: str) -> frozenset[str]:
  # Imported here: the registry pulls in every model, which selection rarely needs.
  from jaxprune import models
  return frozenset(models.MODELS[model_name]().default_widths())


def preset_ratios(preset: str, structure: Structure) -> dict[str, float]:
  """The preset's removal ratio for every prunable group, after checking the model family."""
  from jaxprune import models
  choose('preset', preset, PRESETS, setting='preset')
  spec = PRESETS[preset]
  groups = frozenset(structure.widths)
  if not any(_group_names(m) == groups for m in spec.models):
    found = next((name for name in models.MODELS if _group_names(name) == groups), None)
    raise ConfigError(f"preset={preset} is for {' or '.join(spec.models)}, not for "
                      f"{found if found else 'a model with groups ' + str(sorted(groups))}.",
                      settings=('preset',))
  return {g: float(spec.ratios.get(g, 0.0)) for g in structure.prunable}


def preset_widths(preset: str, structure: Structure) -> dict[str, int]:
  """Every group's width under the preset, int(C * (1 - ratio)) and at least 1, as
  `models.build(name, widths=...)` takes them (which channels it keeps does not matter)."""
  ratios = preset_ratios(preset, structure)
  return {g: max(1, int(w * (1 - ratios[g]))) if g in ratios else w
          for g, w in structure.widths.items()}


# Validation. Scores and current masks come from code (a criterion, an earlier selection), so
# a wrong one is a bug (ValueError, KeyError); the policy, its argument and the counts are
# what a user sets, so a wrong one is a ConfigError naming the setting.

# The setting each policy argument comes from: `ratio` is what users know as `prune_ratio`.
_SETTING = {'ratio': 'prune_ratio', 'target_macs': 'target_macs', 'preset': 'preset'}
# What a numeric policy argument is, and the interval it must lie in.
_RANGES = {'ratio': ('the fraction of channels to remove', '[0, 1)', lambda v: 0 <= v < 1),
           'target_macs': ('the fraction of the original MACs to keep', '(0, 1]',
                           lambda v: 0 < v <= 1)}


def _check_scores(structure: Structure, scores: Scores) -> dict[str, np.ndarray]:
  missing = [g for g in structure.prunable if g not in scores]
  if missing:
    raise KeyError(f"scores are missing the prunable groups {missing}; every prunable "
                   "group needs a score per channel.")
  unknown = [g for g in scores if g not in structure.prunable]
  if unknown:
    raise ValueError(f"scores name groups {unknown} that are not prunable; the prunable "
                     f"groups are {list(structure.prunable)}.")
  out = {}
  for g in structure.prunable:
    s = np.asarray(scores[g], dtype=np.float64)
    if s.shape != (structure.widths[g],):
      raise ValueError(f"scores for group {g!r} have shape {s.shape}; expected "
                       f"({structure.widths[g]},), one per channel.")
    if not np.all(np.isfinite(s)):
      raise ValueError(f"scores for group {g!r} contain NaN or infinite values; "
                       "selection needs finite scores.")
    out[g] = s
  return out


def _check_live(structure: Structure, current: Mapping | None) -> dict[str, np.ndarray]:
  """Boolean live-channel arrays for every prunable group (all live without `current`)."""
  kept = shrink.kept_indices(structure, current or {})
  return {g: np.isin(np.arange(structure.widths[g]), kept[g]) if g in kept
          else np.ones(structure.widths[g], bool) for g in structure.prunable}


def _check_count(name: str, value) -> int:
  if int(value) != value or value < 1:
    raise ConfigError(f"{name} must be an integer of at least 1, got {value!r}.",
                      settings=(name,))
  return int(value)


def _check_penalty(flops_penalty, flops_cost: str) -> float:
  if flops_penalty < 0:
    raise ConfigError(f"flops_penalty must be at least 0, got {flops_penalty!r}.",
                      settings=('flops_penalty',))
  choose('flops_cost', flops_cost, FLOPS_COSTS, setting='flops_cost')
  return float(flops_penalty)


def _check_argument(name: str, needs: str, value):
  """The argument `needs` ('ratio', 'target_macs' or 'preset') of selection `name`."""
  setting = _SETTING[needs]
  if needs == 'preset':
    if value is None:
      raise ConfigError(f"selection={name} needs preset; choose one of: "
                        f"{', '.join(sorted(PRESETS))}.", settings=('selection', 'preset'))
    choose('preset', value, PRESETS, setting='preset')
    return value
  what, interval, inside = _RANGES[needs]
  if value is None:
    raise ConfigError(f"selection={name} needs {setting}, {what}, in {interval}.",
                      settings=('selection', setting))
  if not inside(value):
    raise ConfigError(f"{setting}={value!r} is outside {interval}; it is {what}.",
                      settings=(setting,))
  return float(value)


def l2_normalize(scores: Scores, masks: Mapping | None = None) -> dict[str, np.ndarray]:
  """Each group's scores divided by their L2 norm over its live channels (mask nonzero)
  [M]; a group whose live scores are all zero is returned unchanged."""
  out = {}
  for g, s in scores.items():
    s = np.asarray(s, dtype=np.float64)
    live = np.ones(s.shape, bool) if masks is None or g not in masks else np.asarray(masks[g]) != 0
    norm = math.sqrt(float(np.sum(s[live] ** 2)))
    out[g] = s / norm if norm > 0 else s
  return out


class _Macs:
  """The MACs polynomial of a structure: each Conv/Dense kernel adds coef * (product of its
  groups' widths), so one channel's marginal cost needs only the terms holding its group."""

  def __init__(self, structure: Structure):
    self.terms = collections.defaultdict(list)  # {group: [(coef, groups of the term)]}
    for key, positions in structure.positions.items():
      tags, shape = structure.axes[key], structure.shapes[key]
      coef = positions * math.prod(s for s, t in zip(shape, tags) if t is None)
      groups = tuple(t for t in tags if t is not None)
      for g in set(groups):
        self.terms[g].append((coef, groups))

  def drop_one(self, group: str, widths: Mapping[str, int]) -> int:
    """MACs saved by removing one channel of `group` at `widths`."""
    return sum(coef * (math.prod(widths[h] for h in groups)
                       - math.prod(widths[h] - (h == group) for h in groups))
               for coef, groups in self.terms[group])


def _live_widths(structure: Structure, live: Mapping[str, np.ndarray]) -> dict[str, int]:
  return {**structure.widths, **{g: int(m.sum()) for g, m in live.items()}}


def _penalised(structure: Structure, scores: Scores, live, penalty: float,
               cost: str = 'relative', normalize: bool = False) -> dict:
  """Scores, first L2-normalised per group with `normalize`, minus the FLOPs penalty."""
  if normalize:
    scores = l2_normalize(scores, live)
  if not penalty:
    return dict(scores)
  widths = _live_widths(structure, live)
  macs = _Macs(structure)
  per_channel = {g: macs.drop_one(g, widths) for g in structure.prunable}
  if cost == 'absolute':
    return {g: s - penalty * per_channel[g] for g, s in scores.items()}
  n_live = sum(widths[g] for g in structure.prunable)
  mean = sum(per_channel[g] * widths[g] for g in structure.prunable) / n_live
  if mean == 0:
    return dict(scores)
  return {g: s - penalty * per_channel[g] / mean for g, s in scores.items()}


def _removal_order(structure: Structure, scores: Scores, live, min_channels: int):
  """Removable channels, lowest score first, as (group, channel) pairs; each group's highest
  `min_channels` live channels are not removable, so any prefix keeps the minimum."""
  values, group_ids, channels = [], [], []
  for gi, g in enumerate(structure.prunable):
    idx = np.flatnonzero(live[g])
    idx = idx[np.argsort(scores[g][idx], kind='stable')]
    idx = idx[:len(idx) - min(min_channels, len(idx))]
    values.append(scores[g][idx])
    group_ids.append(np.full(len(idx), gi))
    channels.append(idx)
  values, group_ids, channels = map(np.concatenate, (values, group_ids, channels))
  order = np.lexsort((channels, group_ids, values))
  return [(structure.prunable[group_ids[i]], int(channels[i])) for i in order]


def _keep_top(score: np.ndarray, live: np.ndarray, keep: int) -> np.ndarray:
  """The `keep` highest-scoring live channels of one group (ties: lower index removed first)."""
  idx = np.flatnonzero(live)
  idx = idx[np.argsort(score[idx], kind='stable')]
  out = np.zeros(live.shape, bool)
  out[idx[len(idx) - keep:]] = True
  return out


def _remove(live, order, n: int) -> dict:
  keep = {g: m.copy() for g, m in live.items()}
  for g, c in order[:n]:
    keep[g][c] = False
  return keep


# Policies. Each takes validated float64 scores and boolean live masks.


def _per_layer(structure, scores, live, *, min_channels, ratio=None, preset=None):
  """Each group keeps int(C * (1 - r)) channels, r = `ratio` or the `preset`'s ratio."""
  ratios = preset_ratios(preset, structure) if preset else dict.fromkeys(scores, ratio)
  keep = {}
  for g, s in scores.items():
    n_live = int(live[g].sum())
    k = min(n_live, max(int(structure.widths[g] * (1 - ratios[g])), min(min_channels, n_live)))
    keep[g] = _keep_top(s, live[g], k)
  return keep


def _global(structure, scores, live, *, ratio, min_channels, flops_penalty, flops_cost,
            normalize=False):
  scores = _penalised(structure, scores, live, flops_penalty, flops_cost, normalize)
  total = sum(structure.widths[g] for g in structure.prunable)
  removed = total - sum(int(m.sum()) for m in live.values())
  wanted = int(ratio * total)
  order = _removal_order(structure, scores, live, min_channels)
  if wanted - removed > len(order):
    raise ConfigError(f"prune_ratio={ratio} removes {wanted} of the {total} prunable channels, "
                      f"but keeping min_channels={min_channels} per group allows removing at "
                      f"most {removed + len(order)}.", settings=('prune_ratio', 'min_channels'))
  return _remove(live, order, max(0, wanted - removed))


def _slimming(structure, scores, live, *, ratio, min_channels):
  magnitude = {g: np.where(live[g], np.abs(s), -np.inf) for g, s in scores.items()}
  pooled = np.sort(np.concatenate(list(magnitude.values())))
  threshold = pooled[int(len(pooled) * ratio)]
  keep = {}
  for g, m in magnitude.items():
    keep[g] = m > threshold
    floor = min(min_channels, int(live[g].sum()))
    if keep[g].sum() < floor:
      keep[g] = _keep_top(m, live[g], floor)
  return keep


def _macs(structure, scores, live, *, target_macs, min_channels, flops_penalty, flops_cost,
          normalize=False):
  scores = _penalised(structure, scores, live, flops_penalty, flops_cost, normalize)
  original = flops.count(structure).macs
  budget = target_macs * original
  widths = _live_widths(structure, live)
  floor = flops.count(structure, {g: min(min_channels, w) if g in live else w
                                  for g, w in widths.items()}).macs
  if floor > budget:
    raise ConfigError(f"target_macs={target_macs} ({int(budget):,} MACs) is below the "
                      f"{floor:,} MACs ({floor / original:.4f} of the original) that keeping "
                      f"min_channels={min_channels} per group allows.",
                      settings=('target_macs', 'min_channels'))
  current = flops.count(structure, widths).macs
  model = _Macs(structure)
  order = _removal_order(structure, scores, live, min_channels)
  n = 0
  while current > budget:
    g, _ = order[n]
    current -= model.drop_one(g, widths)
    widths[g] -= 1
    n += 1
  return _remove(live, order, n)


def sampled_widths(structure: Structure, live: Mapping[str, np.ndarray], target_macs: float,
                   min_channels: int, width_profile: int) -> dict[str, int]:
  """The width profile number `width_profile` at `target_macs` of the structure's MACs.

  Every prunable group draws a keep fraction f_g from U(PROFILE_LOW, 1) (numpy's generator
  seeded with `width_profile`, in the structure's group order); the widths are
  round(s * f_g * live_g), between min_channels and the live width, for the largest common
  factor s whose MACs stay within the budget; single channels are then added, to the group
  furthest below its drawn share first, while the MACs stay within it. Groups that are not
  prunable keep their widths.
  """
  rng = np.random.default_rng(width_profile)
  fractions = dict(zip(structure.prunable,
                       rng.uniform(PROFILE_LOW, 1.0, len(structure.prunable))))
  live_widths = _live_widths(structure, live)
  floor = {g: min(min_channels, live_widths[g]) for g in structure.prunable}
  budget = target_macs * flops.count(structure).macs

  def scaled(factor: float) -> dict[str, int]:
    widths = dict(live_widths)
    for g, f in fractions.items():
      widths[g] = min(live_widths[g], max(floor[g], int(round(factor * f * live_widths[g]))))
    return widths

  if flops.count(structure, scaled(0.0)).macs > budget:
    raise ConfigError(f"target_macs={target_macs} ({int(budget):,} MACs) is below what "
                      f"keeping min_channels={min_channels} per group allows.",
                      settings=('target_macs', 'min_channels'))
  low, high = 0.0, 1.0 / PROFILE_LOW
  for _ in range(50):
    mid = (low + high) / 2
    if flops.count(structure, scaled(mid)).macs <= budget:
      low = mid
    else:
      high = mid
  widths = scaled(low)
  macs = flops.count(structure, widths).macs
  model = _Macs(structure)
  while True:
    for g in sorted(structure.prunable,
                    key=lambda g: widths[g] / (fractions[g] * live_widths[g])):
      added = model.drop_one(g, {**widths, g: widths[g] + 1})
      if widths[g] < live_widths[g] and macs + added <= budget:
        widths[g] += 1
        macs += added
        break
    else:
      return widths


def random_channels(masks: Mapping[str, np.ndarray], rng: np.random.Generator) -> Masks:
  """Masks keeping as many channels per group as `masks`, drawn uniformly at random."""
  out = {g: np.zeros(np.shape(m), np.float32) for g, m in masks.items()}
  for g, m in masks.items():
    out[g][rng.choice(np.size(m), size=np.count_nonzero(np.asarray(m) > 0), replace=False)] = 1
  return out


def _random_widths(structure, scores, live, *, target_macs, min_channels, width_profile):
  widths = sampled_widths(structure, live, target_macs, min_channels, width_profile)
  return {g: _keep_top(scores[g], live[g], widths[g]) for g in structure.prunable}


@dataclasses.dataclass(frozen=True)
class Selection:
  """A registered policy."""
  fn: Callable[..., dict]  # validated scores and live masks -> boolean keep masks
  needs: str  # the one argument of `select` it requires: 'ratio', 'target_macs' or 'preset'
  penalty: bool = False  # whether it accepts a FLOPs penalty
  profile: bool = False  # whether it takes `width_profile`


SELECTIONS: dict[str, Selection] = {
    'layer': Selection(_per_layer, 'ratio'),
    'global': Selection(_global, 'ratio', penalty=True),
    'global_l2': Selection(functools.partial(_global, normalize=True), 'ratio', penalty=True),
    'slimming': Selection(_slimming, 'ratio'),
    'macs': Selection(_macs, 'target_macs', penalty=True),
    'macs_l2': Selection(functools.partial(_macs, normalize=True), 'target_macs', penalty=True),
    'preset': Selection(_per_layer, 'preset'),
    'random_widths': Selection(_random_widths, 'target_macs', profile=True),
}


def select(name: str, structure: Structure, scores: Scores, *, ratio: float | None = None,
           target_macs: float | None = None, preset: str | None = None, min_channels: int = 1,
           flops_penalty: float = 0.0, current: Mapping | None = None,
           round_to: int = 1, flops_cost: str = 'relative', width_profile: int = 0) -> Masks:
  """{group: (C,) float32 0/1 keep mask} for every prunable group, by the policy `name`.

  The policy takes exactly one of `ratio` (fraction of the structure's channels to remove:
  the `prune_ratio` setting, the name its errors use), `target_macs` (fraction of its MACs
  to keep at most) or `preset` (a key of `PRESETS`), as `SELECTIONS[name].needs` says.
  Groups that `current` (0 = removed) leaves out are live; `min_channels`, `flops_penalty`
  (0 = off), `flops_cost`, `round_to` and `width_profile` are as the module docstring says.
  """
  choose('selection', name, SELECTIONS, setting='selection')
  round_to = _check_count('round_to', round_to)
  policy = SELECTIONS[name]
  given = {'ratio': ratio, 'target_macs': target_macs, 'preset': preset}
  extra = [_SETTING[k] for k, v in given.items() if v is not None and k != policy.needs]
  if extra:
    raise ConfigError(f"selection={name} takes {_SETTING[policy.needs]}, not "
                      f"{' or '.join(extra)}.",
                      settings=('selection', _SETTING[policy.needs], *extra))
  if flops_penalty and not policy.penalty:
    raise ConfigError(f"selection={name} takes no flops_penalty; the global policies "
                      f"{', '.join(n for n, s in SELECTIONS.items() if s.penalty)} do.",
                      settings=('selection', 'flops_penalty'))
  flops_penalty = _check_penalty(flops_penalty, flops_cost)
  argument = _check_argument(name, policy.needs, given[policy.needs])
  min_channels = _check_count('min_channels', min_channels)
  scores = _check_scores(structure, scores)
  live = _check_live(structure, current)
  options = {'flops_penalty': flops_penalty, 'flops_cost': flops_cost} if policy.penalty else {}
  if policy.profile:
    if int(width_profile) != width_profile or width_profile < 0:
      raise ConfigError(f"width_profile must be a whole number >= 0, got {width_profile!r}.",
                        settings=('width_profile',))
    options['width_profile'] = int(width_profile)
  keep = policy.fn(structure, scores, live, **{policy.needs: argument},
                   min_channels=min_channels, **options)
  if round_to > 1:
    keep = {g: _keep_top(scores[g], live[g],
                         min(int(live[g].sum()), -(-int(keep[g].sum()) // round_to) * round_to))
            for g in structure.prunable}
  return {g: keep[g].astype(np.float32) for g in structure.prunable}


def remove_lowest(structure: Structure, scores: Scores, current: Mapping | None, k: int, *,
                  normalize: bool = False, flops_penalty: float = 0.0,
                  min_channels: int = 1, flops_cost: str = 'relative') -> Masks:
  """Masks for every prunable group with the k globally lowest-scoring live channels of
  `current` (None = all live) removed too: one step of iterative pruning. `normalize`
  L2-normalises each group's scores over its live channels first [M]; the other arguments
  are as for `select`."""
  if int(k) != k or k < 0:
    raise ValueError(f"k must be a non-negative integer number of channels, got {k!r}.")
  flops_penalty = _check_penalty(flops_penalty, flops_cost)
  min_channels = _check_count('min_channels', min_channels)
  scores = _check_scores(structure, scores)
  live = _check_live(structure, current)
  scores = _penalised(structure, scores, live, flops_penalty, flops_cost, normalize)
  order = _removal_order(structure, scores, live, min_channels)
  if k > len(order):
    raise ConfigError(f"cannot remove {k} more channels: keeping min_channels={min_channels} "
                      f"per group leaves only {len(order)} removable.", settings=('min_channels',))
  keep = _remove(live, order, int(k))
  return {g: keep[g].astype(np.float32) for g in structure.prunable}
