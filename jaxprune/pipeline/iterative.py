"""Iterative pruning ([M], [C]): fine-tuning that accumulates the criterion, with removals.

Every `prune_every` steps the `prune_step` lowest-scored channels are masked out (a global
ranking, L2-normalised per layer for the `_l2` policies), until the ratio's (or the MACs
target's) channels are gone. Masks are inputs of the compiled train step, so no removal
recompiles. The fine-tuning is a resumable stage (prune/finetune/, pruning_curve.jsonl).
"""

import dataclasses
import json
import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import data as data_lib
from jaxprune import train
from jaxprune.prune import criteria, flops, select
from jaxprune.train import checkpoint


def prune(config, model, prog, variables, data, stage, *, options: train.TrainOptions,
          spec: data_lib.DataSpec, scoring_batches: Callable[[], Iterable]):
  """(masks, fine-tuned variables, final scores or None) of iterative pruning of `model` (its
  program `prog`) in `stage`, fine-tuning with `options` on batches augmented as `spec` says."""
  structure = prog.structure
  total = sum(structure.widths[g] for g in structure.prunable)
  if config.prune_ratio is not None:
    removals = int(config.prune_ratio * total)
  else:
    # The number of channels a one-shot MACs selection removes sets the schedule's length;
    # a final one-shot top-up guarantees the target.
    guess = select.select(config.selection, structure, criteria.score('l1', prog, variables, None),
                          target_macs=config.target_macs, min_channels=config.min_channels)
    removals = int(sum(structure.widths[g] - m.sum() for g, m in guess.items()))
  rounds = math.ceil(removals / config.prune_step)
  steps_per_epoch = data_lib.steps_per_epoch(data.dataset.num_train, options.batch_size)
  epochs = max(1, math.ceil(rounds * config.prune_every / steps_per_epoch))
  criterion = criteria.get(config.criterion)
  accumulate = criteria.accumulator(criterion, prog)
  normalize = config.selection.endswith('_l2')
  rng = jax.random.key(config.seed)
  masks = {g: np.ones(structure.widths[g], np.float32) for g in structure.prunable}
  since = removed = None  # Steps since the last removal, channels removed.

  def hook(state, batch, current, hook_state):
    nonlocal since, removed
    if since is None:  # first call, or after a resume: one read of the state
      since, removed = int(hook_state['since']), int(hook_state['removed'])
      masks.update({g: np.asarray(m) for g, m in current.items()})
    acc = accumulate(hook_state['criterion'], state.variables, current, batch)
    since += 1
    if since >= config.prune_every and removed < removals:
      scores = criterion.finalize(acc, prog, state.variables)
      k = min(config.prune_step, removals - removed)
      host_masks = {g: np.asarray(m) for g, m in current.items()}
      # Same dtype and placement as before, so the train step does not recompile.
      current = {g: jax.device_put(m.astype(host_masks[g].dtype), current[g].sharding)
                 for g, m in select.remove_lowest(
                     structure, scores, host_masks, k, normalize=normalize,
                     flops_penalty=config.flops_penalty, flops_cost=config.flops_cost,
                     min_channels=config.min_channels).items()}
      masks.update({g: np.asarray(m) for g, m in current.items()})
      removed += k
      since = 0
      acc = criterion.init(structure, rng)
    return current, {'criterion': acc, 'since': jnp.asarray(since), 'removed': jnp.asarray(removed)}

  masks_path = stage / 'finetune' / 'masks.json'
  history_path = stage / 'finetune' / 'pruning_curve.jsonl'

  def save_masks(state, epoch_record):
    # After every epoch's checkpoint, so a finished (or resumed) stage always has them.
    checkpoint.write_text(masks_path, json.dumps({g: m.tolist() for g, m in masks.items()}))
    live = {g: int(m.sum()) for g, m in masks.items()}
    point = {'epoch': epoch_record['epoch'], 'test_accuracy': epoch_record['test_accuracy'],
             'channels_removed': int(total - sum(live.values())),
             'macs': flops.count(structure, {**structure.widths, **live}).macs}
    lines = history_path.read_text().splitlines() if history_path.exists() else []
    kept = [l for l in lines if json.loads(l)['epoch'] < epoch_record['epoch']]
    checkpoint.write_text(history_path, ''.join(l + '\n' for l in kept + [json.dumps(point)]))

  hook_state = {'criterion': criterion.init(structure, rng), 'since': jnp.asarray(0),
                'removed': jnp.asarray(0)}
  finetuned, _ = train.fit(
      model, variables, data.arrays, spec, dataclasses.replace(options, epochs=epochs),
      stage_dir=stage / 'finetune', seed=config.seed, masks=masks, structure=structure,
      step_hook=hook, hook_state=hook_state, callbacks=(save_masks,))
  masks = {g: np.asarray(m, np.float32) for g, m in json.loads(masks_path.read_text()).items()}
  if config.target_macs is None:
    return masks, finetuned, None
  scores = criteria.score(config.criterion, prog, finetuned, scoring_batches(), masks=masks,
                          rng=rng)
  masks = select.select(config.selection, structure, scores, target_macs=config.target_macs,
                        min_channels=config.min_channels, flops_penalty=config.flops_penalty,
                        flops_cost=config.flops_cost, current=masks)
  return masks, finetuned, scores
