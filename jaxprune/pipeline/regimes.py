"""Training regimes: plans that turn (baseline, pruned structure) into (widths, initial variables, epochs, optimizer).

A regime is a plan, not a script; `pipeline` trains every plan with the same `train.fit`.

* `finetune` [R]: the pruned network with its inherited weights, `finetune_epochs`
  at a constant learning rate `finetune_lr`.
* `scratch` (scratch-E) [R]: the pruned architecture, fresh random init, the
  baseline's epochs and schedule.
* `scratch_b` [R]: as scratch, with the baseline's computation budget:
  int(epochs * MACs_full / MACs_pruned) epochs (at most `scratch_b_cap` x epochs
  when a cap is set); the step schedule decays at the same fractions (50%, 75%).
* `lottery` [R]: the pruned architecture started from the baseline's *initial*
  weights, sliced by the kept channels.
* `reduced` [C]: the unpruned architecture made uniformly thinner (every width,
  stream widths included, times one factor) until its MACs do not exceed the
  pruned network's; fresh init, the baseline's epochs.

Retraining never applies network slimming's BN-scale sparsity: it belongs to the
baseline that is about to be pruned.
"""

import dataclasses
from typing import Callable, Mapping

import jax
import numpy as np

from jaxprune import models, train
from jaxprune.prune import flops, shrink
from jaxprune.models.layers import INDICES
from jaxprune.prune.structure import Structure

REGIMES = ('finetune', 'scratch', 'scratch_b', 'lottery', 'reduced')


@dataclasses.dataclass(frozen=True)
class Pruned:
  """What the prune stage hands to the regimes."""
  structure: Structure          # of the unpruned model
  masks: Mapping[str, np.ndarray]
  widths: Mapping[str, int]     # after shrinking
  variables: Mapping            # shrunk, trained weights
  baseline_init: Mapping        # the unpruned model's initial variables


@dataclasses.dataclass(frozen=True)
class Plan:
  widths: Mapping[str, int]
  variables: Mapping
  epochs: int
  optimizer: train.OptimizerConfig


def uniform_widths(structure: Structure, max_macs: int) -> dict[str, int]:
  """The widths scaled by one factor, as large as possible with MACs <= max_macs."""
  def scaled(factor):
    return {g: max(1, int(round(w * factor))) for g, w in structure.widths.items()}
  low, high = 0.0, 1.0
  for _ in range(40):
    mid = (low + high) / 2
    if flops.count(structure, scaled(mid)).macs <= max_macs:
      low = mid
    else:
      high = mid
  return scaled(low)


def scratch_b_epochs(epochs: int, macs_full: int, macs_pruned: int, cap: float | None) -> int:
  """int(epochs * MACs_full / MACs_pruned), at most cap * epochs when a cap is given."""
  scaled = int(epochs * macs_full / macs_pruned)
  return min(scaled, int(cap * epochs)) if cap else scaled


def _fresh(build: Callable, widths, like, image_shape, rng) -> dict:
  model = build(widths)
  variables = dict(models.init(model, rng, image_shape))
  if like is not None and INDICES in like:
    # Which stream channels a selection layer reads is architecture, not weights.
    variables[INDICES] = like[INDICES]
  return variables


def plan(regime: str, pruned: Pruned, *, build: Callable, image_shape, epochs: int,
         optimizer: train.OptimizerConfig, finetune_epochs: int,
         finetune_lr: float, scratch_b_cap: float | None, seed: int) -> Plan:
  """The plan of one regime (see the module docstring); `build(widths)` makes the model."""
  retrain = dataclasses.replace(optimizer, bn_l1=0.0)
  rng = jax.random.fold_in(jax.random.key(seed), 1 + REGIMES.index(regime))
  if regime == 'finetune':
    return Plan(pruned.widths, pruned.variables, finetune_epochs,
                dataclasses.replace(retrain, learning_rate=finetune_lr, schedule='constant'))
  if regime == 'scratch':
    return Plan(pruned.widths, _fresh(build, pruned.widths, pruned.variables,
                                      image_shape, rng), epochs, retrain)
  if regime == 'scratch_b':
    full = flops.count(pruned.structure).macs
    small = flops.count(pruned.structure, pruned.widths).macs
    return Plan(pruned.widths, _fresh(build, pruned.widths, pruned.variables,
                                      image_shape, rng),
                scratch_b_epochs(epochs, full, small, scratch_b_cap), retrain)
  if regime == 'lottery':
    _, variables, _ = shrink.shrink(pruned.structure, pruned.baseline_init, pruned.masks)
    return Plan(pruned.widths, variables, epochs, retrain)
  if regime == 'reduced':
    widths = uniform_widths(pruned.structure, flops.count(pruned.structure, pruned.widths).macs)
    return Plan(widths, _fresh(build, widths, None, image_shape, rng),
                epochs, retrain)
  raise ValueError(f"unknown regime {regime!r}")
