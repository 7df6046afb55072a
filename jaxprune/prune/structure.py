"""The channel structure of a model: which axis of which variable belongs to which group.

A `Structure` is what selection, cost counting and the criteria read; `program.derive`
reads it off the model's traced program (the one derivation), and `jaxpr.Graph.structure`
builds it.
"""

import dataclasses
from typing import Mapping

LeafKey = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Structure:
  """The channel structure of one model at one input shape.

  Attributes:
    widths: the width of every group the structure tags (the prunable ones, and for a
      built-in model also the widths it declares but does not prune, e.g. its streams).
    prunable: groups that masks may prune.
    axes: for every variable leaf (flattened key, collection first), the group of
      each axis, or None for a constant axis.
    shapes: every leaf's shape at `widths`.
    positions: for every Conv/Dense kernel leaf, the number of output positions
      per example (H_out * W_out for a conv, 1 for a dense layer).
  """
  widths: Mapping[str, int]
  prunable: tuple[str, ...]
  axes: Mapping[LeafKey, tuple[str | None, ...]]
  shapes: Mapping[LeafKey, tuple[int, ...]]
  positions: Mapping[LeafKey, int]

  def leaves_of(self, group: str) -> list[tuple[LeafKey, int]]:
    """(leaf, axis) pairs that a group's channels index."""
    return [(key, axis) for key, tags in self.axes.items()
            for axis, tag in enumerate(tags) if tag == group]
