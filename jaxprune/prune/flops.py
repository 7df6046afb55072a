"""Multiply-accumulates (MACs, the pruning papers' "FLOPs") and parameter counts for any widths.

Both are exact polynomials in the widths read off a `Structure`: a leaf's size is the
product of its axes, each a constant or a group's width, and a kernel's MACs are its size
times its output positions. Counting compiles nothing and takes microseconds.

Conventions: MACs count conv and dense multiply-accumulates for one example
(k_h * k_w * C_in * C_out * H_out * W_out per conv, padding taps included); params count
every trainable parameter, BN scale and bias included, not BN running statistics.
"""

import dataclasses
import math
from typing import Mapping

import numpy as np
from flax import traverse_util

from jaxprune.prune.structure import Structure


@dataclasses.dataclass(frozen=True)
class Cost:
  macs: int
  params: int


def _size(shape, tags, widths) -> int:
  return math.prod(widths[t] if t is not None else s for s, t in zip(shape, tags))


def count(structure: Structure, widths: Mapping[str, int] | None = None) -> Cost:
  """MACs and params of the structure's model built with `widths` (default: its own)."""
  widths = structure.widths if widths is None else widths
  params = sum(_size(structure.shapes[k], tags, widths)
               for k, tags in structure.axes.items() if k[0] == 'params')
  macs = sum(n * _size(structure.shapes[k], structure.axes[k], widths)
             for k, n in structure.positions.items())
  return Cost(macs=macs, params=params)


# Bytes per float32 parameter while training: the parameter, its gradient, the SGD momentum,
# the updated copy, the initial weights a run keeps (lottery) and a checkpoint's host copy.
PARAMETER_BYTES = 6 * 4
# Bytes per float32 activation while training: each Conv/Dense output, its BatchNorm and
# nonlinearity outputs kept for the backward pass, and one gradient at a time.
ACTIVATION_BYTES = 4 * 4


def training_bytes(structure: Structure, batch_size: int) -> int:
  """A lower estimate of one training step's memory: the parameters with their optimizer
  state and a batch's activations (above); XLA's buffers, fusion and the data add to it."""
  activations = sum(n * structure.shapes[k][-1] for k, n in structure.positions.items())
  return (count(structure).params * PARAMETER_BYTES
          + batch_size * activations * ACTIVATION_BYTES)


def per_group(structure: Structure, widths: Mapping[str, int] | None = None) -> dict[str, Cost]:
  """MACs and params that would go away if one channel of each group were removed."""
  widths = structure.widths if widths is None else widths
  total = count(structure, widths)
  fewer = {g: count(structure, {**widths, g: widths[g] - 1}) for g in structure.widths}
  return {g: Cost(macs=total.macs - c.macs, params=total.params - c.params)
          for g, c in fewer.items()}


def count_masked(structure: Structure, weight_masks: Mapping) -> Cost:
  """MACs and params of the structure's model at its widths without the weights that
  `weight_masks` (0/1 arrays at the params' paths, `train.WEIGHT_MASKS`) zero: a masked
  kernel's MACs are its output positions times its unmasked weights."""
  zeros = {('params',) + key: int(np.size(mask) - np.count_nonzero(mask))
           for key, mask in traverse_util.flatten_dict(dict(weight_masks)).items()}
  full = count(structure)
  return Cost(macs=full.macs - sum(structure.positions.get(k, 0) * n for k, n in zeros.items()),
              params=full.params - sum(zeros.values()))
