"""Masks -> physically smaller variables (a pure function over pytrees): the one shrinker.

Every axis of every variable leaf is cut to the channels its groups keep, as the model's
program lays them out (`jaxpr.Graph`): an axis of one group is indexed by that group's
kept channels, an axis holding several (a concatenation, a grouped convolution's slots)
by each piece's. A built-in model is then the same class built with the new widths; any
other model runs its own program on the smaller arrays.
"""

from typing import Mapping

import numpy as np
from flax import traverse_util

from jaxprune.prune import jaxpr as jaxpr_lib
from jaxprune.prune.structure import Structure


def check_masks(structure: Structure, masks: Mapping | None, batch: int | None = None) -> dict:
  """The masks, checked: each names a prunable group and has shape (C,), or (batch, C) for a
  per-example gate when `batch` is given. Masks come from code, so a wrong one is a
  ValueError; a caller reading masks from a user's file raises its own ConfigError."""
  masks = {} if masks is None else dict(masks)
  for group, mask in masks.items():
    if group not in structure.prunable:
      raise ValueError(f"mask for unknown group {group!r}; the prunable groups are "
                       f"{list(structure.prunable)}.")
    width = structure.widths[group]
    allowed = [(width,)] + ([(batch, width)] if batch is not None else [])
    if tuple(np.shape(mask)) not in allowed:
      raise ValueError(f"mask for group {group!r} has shape {tuple(np.shape(mask))}; "
                       f"allowed: {' or '.join(map(str, allowed))}.")
  return masks


def kept_indices(structure: Structure, masks: Mapping) -> dict[str, np.ndarray]:
  """Indices of the channels a (C,) mask keeps, per group (masks checked by `check_masks`).
  A mask removing a whole group is a ValueError: nothing after an empty group would be
  computed from the input (an empty ResNet block would still add its BN shift)."""
  kept = {}
  for group, mask in check_masks(structure, masks).items():
    keep = np.flatnonzero(np.asarray(mask))
    if keep.size == 0:
      raise ValueError(f"mask for group {group!r} removes all {structure.widths[group]} "
                       "channels; every group must keep at least one.")
    kept[group] = keep
  return kept


def widths_after(structure: Structure, kept: Mapping[str, np.ndarray]) -> dict[str, int]:
  """The structure's widths with every group in `kept` at its number of kept channels."""
  return {**structure.widths, **{g: int(k.size) for g, k in kept.items()}}


def shrink(program, variables: Mapping, masks: Mapping):
  """(widths, variables, kept): the new widths, the variables without the masked-out
  channels and, per masked group, the indices of the kept channels in the input model.

  `program` is the model's (`program.derive`, or a `Pruner`'s); `variables` are at its
  widths; `masks` are {group: (C,) array}, nonzero = keep; groups not named keep all.
  """
  kept = kept_indices(program.structure, masks)
  flat = traverse_util.flatten_dict(dict(variables))
  for key, layouts in zip(program.leaf_keys, program.graph.leaf_layouts):
    # On the host: `jnp.take` would compile one program per leaf shape and index count.
    flat[key] = jaxpr_lib.slice_leaf(flat[key], layouts, program.graph, kept)
  return widths_after(program.structure, kept), traverse_util.unflatten_dict(flat), kept
