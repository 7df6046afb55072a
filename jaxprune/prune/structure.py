"""Which axis of which variable belongs to which channel group, derived mechanically.

`derive(model, image_shape)` traces `init` (shapes only, nothing is computed or
compiled) at the model's widths and at two probe configurations in which every
group gets a distinct large width. An axis whose size follows one group's probe
width in both probes belongs to that group; an axis whose size never moves is a
constant; anything else (an axis that grows with two groups, or with a multiple
of one) is an error in the model's design, reported by name. Adding a model
therefore means writing only the model.

The same trace records every Conv and Dense call's output positions, which is
all `flops.count` needs to count multiply-accumulates for any widths.
"""

import dataclasses
import functools
import math
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxprune.models import widths_of

# Probe widths are far above any real width or constant axis of the models, so a
# probe width can only appear on an axis that follows that group.
_PROBES = (10_007, 20_011)

LeafKey = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Structure:
  """The channel structure of one model at one input shape.

  Attributes:
    widths: the widths the structure was derived at.
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


def _leaf_shapes(model: nn.Module, image_shape) -> tuple[dict, dict]:
  positions = {}

  def record_positions(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(context.module, (nn.Conv, nn.Dense)):
      positions[('params',) + tuple(context.module.path) + ('kernel',)] = math.prod(
          out.shape[1:-1])
    return out

  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  with nn.intercept_methods(record_positions):
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  flat = traverse_util.flatten_dict(variables)
  return {k: tuple(v.shape) for k, v in flat.items()}, positions


def derive(model: nn.Module, image_shape=(32, 32, 3)) -> Structure:
  """Derives the channel structure of `model` (built at its widths) for one image shape."""
  widths = widths_of(model)
  shapes, positions = _leaf_shapes(model, image_shape)
  probes = []
  for base in _PROBES:
    # Increasing in group order: streams listed first stay non-decreasing, as
    # models with zero-padding shortcuts require.
    probe_widths = {g: base + i for i, g in enumerate(widths)}
    probe_shapes, _ = _leaf_shapes(model.clone(widths=probe_widths), image_shape)
    if set(probe_shapes) != set(shapes):
      raise ValueError(f"{type(model).__name__} creates different variables when its widths "
                       "change; layers must not depend on widths.")
    probes.append((probe_widths, probe_shapes))
  by_probe = {(probes[0][0][g], probes[1][0][g]): g for g in widths}

  axes = {}
  for key, shape in shapes.items():
    tags = []
    for axis, size in enumerate(shape):
      sizes = tuple(p_shapes[key][axis] for _, p_shapes in probes)
      if sizes[0] == sizes[1] == size:
        tags.append(None)
      elif sizes in by_probe and widths[by_probe[sizes]] == size:
        tags.append(by_probe[sizes])
      else:
        raise ValueError(f"axis {axis} of {'/'.join(key)} in {type(model).__name__} follows "
                         "the widths but not exactly one group's width.")
    axes[key] = tuple(tags)
  return Structure(widths=dict(widths), prunable=tuple(model.prunable_groups()), axes=axes,
                   shapes=shapes, positions=positions)
