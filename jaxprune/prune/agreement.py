"""Rank agreement between two criteria's scores: Spearman's rho per layer and across layers [M].

[M] ranks every criterion against the oracle this way: per layer (one rho per group, and
their mean) and over all layers pooled, after per-layer L2 normalisation so that layers of
different scale are comparable. Rho is NaN when either ranking is constant (e.g. all-zero
scores) or has fewer than two channels, and `mean_per_layer` averages the defined values
only (NaN if there are none). Ties get average ranks, as in `scipy.stats.spearmanr`.
"""

import dataclasses
from typing import Mapping

import numpy as np
from scipy import stats

from jaxprune.prune.select import l2_normalize


@dataclasses.dataclass(frozen=True)
class Agreement:
  """Spearman's rho of two criteria: per group, their mean, and over all channels pooled."""
  per_layer: dict[str, float]
  mean_per_layer: float
  across_layers: float


def spearman(a, b) -> float:
  """Spearman's rho of two equal-length score vectors; NaN when either is constant."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(f"cannot rank-correlate scores of {a.size} and {b.size} channels; "
                     "both criteria must score the same channels.")
  # spearmanr warns and returns NaN for constant input; decide it here, silently.
  if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
    return float('nan')
  return float(stats.spearmanr(a, b).statistic)


def _live_pairs(a: Mapping, b: Mapping, masks: Mapping | None):
  """Per group, both criteria's scores on the live channels, after checking they match."""
  if set(a) != set(b):
    raise ValueError(f"the two criteria score different groups: {sorted(set(a) ^ set(b))} "
                     "appear in only one.")
  pairs = {}
  for g in a:
    x, y = np.asarray(a[g], np.float64), np.asarray(b[g], np.float64)
    if x.shape != y.shape:
      raise ValueError(f"scores for group {g!r} have shapes {x.shape} and {y.shape}; both "
                       "criteria must score the same channels.")
    if masks is not None and g in masks:
      live = np.asarray(masks[g]) != 0
      x, y = x[live], y[live]
    pairs[g] = (x, y)
  return pairs


def per_layer(a: Mapping, b: Mapping, masks: Mapping | None = None) -> dict[str, float]:
  """{group: rho} over each group's live channels (mask nonzero; all without masks)."""
  return {g: spearman(x, y) for g, (x, y) in _live_pairs(a, b, masks).items()}


def across_layers(a: Mapping, b: Mapping, masks: Mapping | None = None,
                  normalize: bool = True) -> float:
  """Rho over all live channels of all groups pooled, each group L2-normalised first if asked."""
  pairs = _live_pairs(a, b, masks)
  if not pairs:
    return float('nan')
  xs = {g: x for g, (x, _) in pairs.items()}
  ys = {g: y for g, (_, y) in pairs.items()}
  if normalize:
    xs, ys = l2_normalize(xs), l2_normalize(ys)
  return spearman(np.concatenate(list(xs.values())), np.concatenate(list(ys.values())))


def agreement(a: Mapping, b: Mapping, masks: Mapping | None = None,
              normalize: bool = True) -> Agreement:
  """Per-layer rhos, their mean over the defined ones, and the pooled rho (see module doc)."""
  layers = per_layer(a, b, masks)
  defined = [r for r in layers.values() if not np.isnan(r)]
  mean = float(np.mean(defined)) if defined else float('nan')
  return Agreement(per_layer=layers, mean_per_layer=mean,
                   across_layers=across_layers(a, b, masks, normalize))
