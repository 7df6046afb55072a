"""The channel structure of a model: which axis of which variable belongs to which group.

What selection, cost counting and the criteria read: `program.derive` reads it off the
model's traced program (the one derivation), `jaxpr.Graph.structure` builds it.
"""

import dataclasses
from typing import Mapping

LeafKey = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Structure:
  """The channel structure of one model at one input shape."""
  # The width of every group it tags: the prunable ones, and for a built-in model also the
  # widths it declares but does not prune (e.g. its streams).
  widths: Mapping[str, int]
  prunable: tuple[str, ...]  # the groups that masks may prune
  # For every variable leaf (flattened key, collection first), the group of each axis, or
  # None for a constant axis.
  axes: Mapping[LeafKey, tuple[str | None, ...]]
  shapes: Mapping[LeafKey, tuple[int, ...]]  # every leaf's shape at `widths`
  # For every Conv/Dense kernel leaf, the output positions per example (H_out * W_out for a
  # conv, 1 for a dense layer).
  positions: Mapping[LeafKey, int]

  def leaves_of(self, group: str) -> list[tuple[LeafKey, int]]:
    """(leaf, axis) pairs that a group's channels index."""
    return [(key, axis) for key, tags in self.axes.items()
            for axis, tag in enumerate(tags) if tag == group]
