"""Training regimes: plans (widths, initial variables, epochs, optimizer), not scripts, that
turn (baseline, pruned network) into what the same `train.fit` trains.

* `finetune` [R]: the pruned network with its inherited weights, `finetune_epochs` at the
  constant `finetune_lr`, in batches of `finetune_batch_size`.
* `scratch` (scratch-E) [R]: the pruned architecture from a fresh init, with the baseline's
  epochs and schedule.
* `scratch_b` [R]: as scratch, for the baseline's budget: int(epochs * MACs_full / MACs_pruned)
  epochs (at most `scratch_b_cap` x epochs), the step schedule's decay epochs scaled alike.
* `lottery` [R]: the pruned network from the baseline's *initial* weights, by `lottery_style`:
  `slice` slices them by the kept channels; `mask` ([R]'s code) keeps the full network with
  every filter producing a removed channel zeroed and held at zero (`train.WEIGHT_MASKS`), its
  MACs counting the nonzero weights. A removed channel then emits relu(beta) with beta at its
  initial 0, the ReLU's kink, where no gradient flows: both styles train the same function.
  Channels no filter produces cannot be masked (ConfigError).
* `reduced` [C]: the unpruned architecture made uniformly thinner (every width, stream widths
  included, times one factor) until its MACs (`reduced_match` macs) or parameters (`params`,
  the stem kept at its width as in [C]'s WideResNets) fit the pruned network's; fresh init,
  the baseline's epochs. A DenseNet's stream is its stem and growth rate: it gets the largest
  growth rate within the budget, every selection reading the whole stream, and a stem widened
  to take up the rest. An own model keeps the same fraction of every prunable group.

Weight-level pruning (`Pruned.weight_masks`) keeps the widths and every regime holds the
removed conv weights at zero: finetune from the masked trained weights, scratch and
scratch_b from a fresh init masked the same way (each kernel's init std divided by
sqrt(its kept fraction), as [R]'s code: `weights.rescale_for_density`), lottery from the
masked initial weights whatever `lottery_style` (a weight mask cannot be sliced);
scratch_b's and reduced's budgets count the nonzero weights' MACs.

Retraining never applies network slimming's BN-scale sparsity: it belongs to the baseline.
"""

import bisect
import dataclasses
from typing import Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jaxprune import models, train
from jaxprune.errors import ConfigError
from jaxprune.models import own
from jaxprune.models.densenet import DenseNet
from jaxprune.models.layers import INDICES
from jaxprune.prune import flops, program, shrink, weights
from jaxprune.prune.program import Program
from jaxprune.prune.structure import Structure

REGIMES = ('finetune', 'scratch', 'scratch_b', 'lottery', 'reduced')
LOTTERY_STYLES = {
    'slice': "the pruned architecture, the baseline's initial weights sliced by the kept "
             'channels',
    'mask': "[R]'s code: the full network from the baseline's initial weights, the removed "
            "channels' conv filters zeroed and held at zero",
}
REDUCED_MATCH = {
    'macs': "at most the pruned network's MACs, every width (the stem's too) scaled",
    'params': "at most the pruned network's parameters, the stem kept at its width "
              "([C]'s reduced WideResNets)",
}


@dataclasses.dataclass(frozen=True)
class Pruned:
  """What the prune stage hands to the regimes."""
  program: Program              # of the unpruned model
  masks: Mapping[str, np.ndarray]
  widths: Mapping[str, int]     # after shrinking
  variables: Mapping            # shrunk, trained weights (weight-level: masked, with the masks)
  baseline_init: Mapping        # the unpruned model's initial variables
  weight_masks: Mapping | None = None  # weight-level pruning's masks (`prune.weights`)
  kept: Mapping[str, np.ndarray] | None = None  # kept channel indices per pruned group

  @property
  def structure(self) -> Structure:
    return self.program.structure

  @property
  def architecture(self) -> Mapping:
    return architecture(self.program.model, self.widths, self.kept)

  def cost(self) -> flops.Cost:
    """The pruned network's MACs and params (weight-level: of its nonzero weights)."""
    if self.weight_masks is not None:
      return flops.count_masked(self.structure, self.weight_masks)
    return flops.count(self.structure, self.widths)


def architecture(model, widths: Mapping[str, int], kept: Mapping | None) -> Mapping:
  """A pruned network as the model builder takes it: a built-in model's widths, or an own
  model's kept channels (its program's constants are cut by the same indices)."""
  if isinstance(model, own.OwnModel) and kept is not None:
    return {**widths, **kept}
  return widths


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a regime trains: `build(architecture)` (default: its widths; or `model`, where the
  regime made a network that is not the configured model at other widths), from
  `variables`, in batches of `batch_size` (None: the baseline's)."""
  widths: Mapping[str, int]
  variables: Mapping
  epochs: int
  optimizer: train.OptimizerConfig
  model: nn.Module | None = None
  batch_size: int | None = None
  architecture: Mapping | None = None

  def network(self, build: Callable) -> nn.Module:
    if self.model is not None:
      return self.model
    return build(self.widths if self.architecture is None else self.architecture)

  def cost(self, structure: Structure, image_shape) -> flops.Cost:
    """The trained network's cost (`structure` is the unpruned model's)."""
    if self.model is not None:
      return flops.count(program.derive(self.model, image_shape).structure)
    if train.WEIGHT_MASKS in self.variables:
      return flops.count_masked(structure, self.variables[train.WEIGHT_MASKS])
    return flops.count(structure, self.widths)


def filter_masks(structure: Structure, masks: Mapping[str, np.ndarray]) -> dict:
  """Weight masks (`train.WEIGHT_MASKS`) zeroing the output filters of the channels
  `masks` removes in every conv (and Dense) kernel that produces them; BN layers are not
  masked, as in [R]'s lottery code (which prunes convs only)."""
  flat = {key[1:]: np.broadcast_to(np.asarray(masks[tags[-1]], np.float32),
                                   structure.shapes[key]).copy()
          for key, tags in structure.axes.items()
          if key[0] == 'params' and key[-1] == 'kernel' and tags[-1] in masks}
  produced = {structure.axes[('params',) + key][-1] for key in flat}
  unmaskable = sorted(g for g, m in masks.items() if not m.all() and g not in produced)
  if unmaskable:
    raise ConfigError(f"lottery_style=mask zeroes the filters that produce the removed "
                      f"channels, but {', '.join(unmaskable)} are no conv's or Dense layer's "
                      "output (e.g. a channel selection); use lottery_style=slice.",
                      settings=('lottery_style',))
  return traverse_util.unflatten_dict(flat)


def masked_start(variables: Mapping, weight_masks: Mapping) -> dict:
  """`variables` with the masked weights zeroed and the masks in `train.WEIGHT_MASKS`."""
  flat = traverse_util.flatten_dict(dict(variables['params']))
  for key, mask in traverse_util.flatten_dict(weight_masks).items():
    flat[key] = flat[key] * mask
  return {**variables, 'params': traverse_util.unflatten_dict(flat),
          train.WEIGHT_MASKS: weight_masks}


def uniform_widths(structure: Structure, budget: int, measure: str = 'macs',
                   fixed: tuple[str, ...] = ()) -> dict[str, int]:
  """The widths scaled by one factor (the groups in `fixed` kept), as large as possible
  with the `measure` ('macs' or 'params') of `flops.count` at most `budget`."""
  def scaled(factor):
    return {g: w if g in fixed else max(1, int(round(w * factor)))
            for g, w in structure.widths.items()}
  low, high = 0.0, 1.0
  for _ in range(40):
    mid = (low + high) / 2
    if getattr(flops.count(structure, scaled(mid)), measure) <= budget:
      low = mid
    else:
      high = mid
  return scaled(low)


def _largest(fits: Callable[[int], bool], low: int, high: int) -> int:
  """The largest n in [low, high] with fits(n), for fits true up to some n (low if none)."""
  return low + bisect.bisect_left(range(low + 1, high + 1), True, key=lambda n: not fits(n))


def reduced_densenet(model: DenseNet, image_shape, budget: int, measure: str) -> DenseNet:
  """The thinner DenseNet of the `reduced` regime (module docstring) within `budget`."""
  def cost(growth, stem):
    thinner = model.clone(growth=growth, stem_width=stem, widths=None)
    return getattr(flops.count(program.derive(thinner, image_shape).structure), measure)
  stem_of = (lambda g: 2 * g) if measure == 'macs' else (lambda g: model.stem_channels())
  growth = _largest(lambda g: cost(g, stem_of(g)) <= budget, 1, model.growth)
  low = high = stem_of(growth)
  while cost(growth, 2 * high) <= budget:
    high *= 2
  stem = _largest(lambda s: cost(growth, s) <= budget, low, 2 * high)
  return model.clone(growth=growth, stem_width=stem, widths=None)


def scratch_b_epochs(epochs: int, macs_full: int, macs_pruned: int, cap: float | None) -> int:
  """int(epochs * MACs_full / MACs_pruned), at most cap * epochs when a cap is given."""
  scaled = int(epochs * macs_full / macs_pruned)
  return min(scaled, int(cap * epochs)) if cap else scaled


def _fresh(build: Callable, widths, like, image_shape, rng, weight_masks=None) -> dict:
  variables = dict(models.init(build(widths), rng, image_shape))
  if like is not None and INDICES in like:
    # Which stream channels a selection layer reads is architecture, not weights.
    variables[INDICES] = like[INDICES]
  if weight_masks is not None:
    variables['params'] = weights.rescale_for_density(variables['params'], weight_masks)
    variables = masked_start(variables, weight_masks)
  return variables


def plan(regime: str, pruned: Pruned, *, build: Callable, image_shape, epochs: int,
         optimizer: train.OptimizerConfig, finetune_epochs: int, finetune_lr: float,
         scratch_b_cap: float | None, seed: int, reduced_match: str = 'macs',
         finetune_batch_size: int | None = None, lottery_style: str = 'slice') -> Plan:
  """The plan of one regime (see the module docstring); `build(widths)` makes the model."""
  retrain = dataclasses.replace(optimizer, bn_l1=0.0)
  rng = jax.random.fold_in(jax.random.key(seed), 1 + REGIMES.index(regime))
  if regime == 'finetune':
    return Plan(pruned.widths, pruned.variables, finetune_epochs,
                dataclasses.replace(retrain, learning_rate=finetune_lr, schedule='constant'),
                batch_size=finetune_batch_size, architecture=pruned.architecture)
  if regime in ('scratch', 'scratch_b'):
    length = epochs
    if regime == 'scratch_b':
      length = scratch_b_epochs(epochs, flops.count(pruned.structure).macs, pruned.cost().macs,
                                scratch_b_cap)
      if retrain.decay_epochs is not None:
        retrain = dataclasses.replace(retrain, decay_epochs=tuple(
            int(m * length / epochs) for m in retrain.decay_epochs))
    return Plan(pruned.widths, _fresh(build, pruned.architecture, pruned.variables,
                                      image_shape, rng, pruned.weight_masks), length, retrain,
                architecture=pruned.architecture)
  if regime == 'lottery':
    if pruned.weight_masks is not None:
      return Plan(pruned.widths, masked_start(pruned.baseline_init, pruned.weight_masks),
                  epochs, retrain)
    if lottery_style == 'mask':
      masks = filter_masks(pruned.structure, pruned.masks)
      return Plan(dict(pruned.structure.widths), masked_start(pruned.baseline_init, masks),
                  epochs, retrain)
    _, variables, _ = shrink.shrink(pruned.program, pruned.baseline_init, pruned.masks)
    return Plan(pruned.widths, variables, epochs, retrain, architecture=pruned.architecture)
  # reduced (REGIMES.index above refuses an unknown regime).
  budget = getattr(pruned.cost(), reduced_match)
  base = build(None)
  if isinstance(base, DenseNet):
    model = reduced_densenet(base, image_shape, budget, reduced_match)
    return Plan(models.widths_of(model), dict(models.init(model, rng, image_shape)), epochs,
                retrain, model)
  fixed = ('stem',) if reduced_match == 'params' else ()
  widths = uniform_widths(pruned.structure, budget, reduced_match, fixed)
  return Plan(widths, _fresh(build, widths, None, image_shape, rng), epochs, retrain)
