"""Masks -> a physically smaller model of the same class (a pure function over pytrees)."""

from typing import Mapping

import numpy as np
from flax import traverse_util

from jaxprune.prune.structure import Structure


def kept_indices(structure: Structure, masks: Mapping) -> dict[str, np.ndarray]:
  """Indices of the channels a (C,) mask keeps, per group; checks names, shapes and emptiness.

  No architecture here can drop a whole group (an empty ResNet block would still add
  its BN shift to the stream), so a mask that removes every channel of a group is
  rejected. Masks come from code (a selection), so a wrong one is a ValueError; a caller
  that reads masks from a user's file says so in its own ConfigError.
  """
  kept = {}
  for group, mask in masks.items():
    if group not in structure.prunable:
      raise ValueError(f"mask for unknown group {group!r}; the prunable groups are "
                       f"{list(structure.prunable)}.")
    mask = np.asarray(mask)
    width = structure.widths[group]
    if mask.shape != (width,):
      raise ValueError(f"mask for group {group!r} has shape {mask.shape}; shrinking needs "
                       f"shape ({width},).")
    keep = np.flatnonzero(mask)
    if keep.size == 0:
      raise ValueError(f"mask for group {group!r} removes all {width} channels; "
                       "every group must keep at least one.")
    kept[group] = keep
  return kept


def shrink(structure: Structure, variables: Mapping, masks: Mapping):
  """Removes the masked-out channels.

  Args:
    structure: the model's structure (`structure.derive`).
    variables: the model's variables at `structure.widths`.
    masks: {group: (C,) array}, nonzero = keep; groups not named keep all channels.

  Returns:
    (widths, variables, kept): the new widths, the smaller variables (build the
    same model class with those widths to use them) and, per masked group, the
    indices of the kept channels in the input model.
  """
  kept = kept_indices(structure, masks)
  widths = dict(structure.widths)
  widths.update({g: int(k.size) for g, k in kept.items()})
  removing = {g: k for g, k in kept.items() if k.size < structure.widths[g]}
  flat = traverse_util.flatten_dict(variables)
  out = {}
  for key, value in flat.items():
    axes = [(axis, tag) for axis, tag in enumerate(structure.axes[key]) if tag in removing]
    if axes:
      # On the host: `jnp.take` would compile one program per leaf shape and index count.
      value = np.asarray(value)
      for axis, tag in axes:
        value = np.take(value, removing[tag], axis=axis)
    out[key] = value
  return widths, traverse_util.unflatten_dict(out), kept
