"""Runs a derived program (`jaxpr.Graph`) masked, gated or shrunk: a jaxpr interpreter.

`evaluate` binds the traced program's primitives one by one, so under `jax.jit` it compiles
to the model's own computation, plus:

* masks: the operand of every convolution and matmul contracting a group's channels is
  multiplied by the group's (C,) mask or (B, C) per-example gate, laid out along that axis
  (there a zero is exactly removal, and a gate of ones is what the gradient criteria read);
* recording: each group's feature map at its record point (`Graph.record_points`), times
  its mask, as (B, positions, C) for the activation criteria; `offsets` of that shape are
  added there, so the gradient with respect to them is dL/dz element by element;
* shrinking: the leaves come cut to the kept channels, the program's constants are cut
  here, and every shape-carrying parameter is recomputed from the layouts.

Call-like primitives (jit, custom_jvp/custom_vjp, checkpoint) run inline, their bodies
interpreted like the rest, so JAX differentiates through their primal programs.
"""

import itertools
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxprune.prune import jaxpr as jaxpr_lib


def _mask_vector(graph, layout, masks, batch):
  """The (N,) or (B, N) multiplier along an axis of `layout`, or None if nothing is masked."""
  pieces = graph.pieces(layout, masks)
  if all(p is None for _, p in pieces):
    return None
  per_example = any(p is not None and p.ndim == 2 for _, p in pieces)
  full = []
  for n, p in pieces:
    if p is None:
      p = jnp.ones((batch, n) if per_example else (n,), jnp.float32)
    elif per_example and p.ndim == 1:
      p = jnp.broadcast_to(p, (batch, n))
    full.append(p)
  return jnp.concatenate(full, axis=-1) if len(full) > 1 else full[0]


def _apply_mask(graph, value, consumer, masks):
  b = graph.batch_axis(consumer.layouts)
  batch = value.shape[b] if b is not None else 1
  for axis in consumer.axes:
    m = _mask_vector(graph, consumer.layouts[axis], masks, batch)
    if m is None:
      continue
    shape = [1] * value.ndim
    shape[axis] = m.shape[-1]
    if m.ndim == 2:
      if b is None:
        raise ValueError(f"a per-example gate reaches {consumer.primitive}, whose operand has no "
                         "batch axis; use (C,) masks there.")
      shape[b] = m.shape[0]
      if b > axis:
        m = m.T
    value = value * m.reshape(shape).astype(value.dtype)
  return value


def _batch_first_channels_last(value, b, axis):
  if b is None:
    return jnp.moveaxis(value, axis, -1)[None]
  return jnp.moveaxis(value, (b, axis), (0, -1))


def _starts(graph, layout, group) -> list[int]:
  """Where each piece of the group's channels starts along an axis of `layout`."""
  roots = graph.atoms.expand(layout)
  offsets = itertools.accumulate((graph.atoms.size[r] for r in roots), initial=0)
  return [offset for r, offset in zip(roots, offsets) if r == graph.root_of[group]]


def _activation(graph, value, layouts, axis, group):
  """The group's channels of a value with `layouts` as (B, positions, C)."""
  z = _batch_first_channels_last(value, graph.batch_axis(layouts), axis)
  width = graph.groups[group].width
  pieces = [z[..., start:start + width] for start in _starts(graph, layouts[axis], group)]
  z = jnp.stack(pieces, axis=-2) if len(pieces) > 1 else pieces[0]
  return z.reshape(z.shape[0], -1, z.shape[-1])


def _offset(graph, value, layouts, axis, group, offset):
  """`value` plus a (B, positions, C) offset laid onto the group's channels (one piece)."""
  b = graph.batch_axis(layouts)
  z = _batch_first_channels_last(value, b, axis)
  start = _starts(graph, layouts[axis], group)[0]
  piece = offset.reshape(z.shape[:-1] + (offset.shape[-1],)).astype(z.dtype)
  z = z.at[..., start:start + offset.shape[-1]].add(piece)
  return jnp.moveaxis(z, (0, -1), (b, axis)) if b is not None else jnp.moveaxis(z[0], -1, axis)


def _rewrite(graph, eqn, site, invals, kept):
  """The primitive's parameters for the shrunk shapes: broadcast, reshape, iota and random
  shapes, slice limits, gather and split sizes, a depthwise convolution's group count."""
  name, params = eqn.primitive.name, dict(eqn.params)
  out_shapes = [tuple(graph.new_size(l, kept) for l in layouts)
                for layouts in graph.out_layouts[site]]
  old = [tuple(np.shape(v.aval)) for v in eqn.invars]
  if name in ('broadcast_in_dim', 'iota', 'random_bits'):
    params['shape'] = out_shapes[0]
  elif name == 'reshape':
    params['new_sizes'] = out_shapes[0]
  elif name == 'conv_general_dilated' and site in graph.depthwise:
    params['feature_group_count'] = invals[0].shape[params['dimension_numbers'][0][1]]
  elif name == 'slice':
    strides = params['strides'] or (1,) * len(old[0])
    params['limit_indices'] = tuple(
        invals[0].shape[i] if (s == 0 and l == old[0][i] and st == 1) else l
        for i, (s, l, st) in enumerate(zip(params['start_indices'], params['limit_indices'], strides)))
  elif name in ('gather', 'dynamic_slice'):
    params['slice_sizes'] = tuple(invals[0].shape[i] if n == old[0][i] else n
                                  for i, n in enumerate(params['slice_sizes']))
  elif name == 'split':
    params['sizes'] = tuple(shape[params['axis']] for shape in out_shapes)
  return params


def evaluate(graph: jaxpr_lib.Graph, leaves, x, *, masks: Mapping | None = None,
             kept: Mapping[str, np.ndarray] | None = None, record: bool = False,
             offsets: Mapping | None = None):
  """The output of the graph's program on (leaves, x) (its only result, or the tuple of
  them), and with `record` the {group: activation} recorded. `leaves` are in
  `graph.leaf_keys` order, already cut to `kept` ({group: kept indices}) when it is given;
  `masks` and `offsets` are by group (module docstring)."""
  masks = masks or {}
  consumers = {}
  if masks:
    for c in graph.consumers:
      consumers.setdefault(c.site, []).append(c)
  recorders = {}
  if record or offsets:
    for group, (site, operand, axis, layouts) in graph.record_points().items():
      recorders.setdefault(site, []).append((operand, axis, layouts, group))
  recorded = {}
  offsets = offsets or {}

  def cut(consts, site):
    if kept is None:
      return list(consts)
    return [jaxpr_lib.slice_leaf(c, l, graph, kept)
            for c, l in zip(consts, graph.const_layouts[site])]

  def run(jaxpr, consts, args, prefix):
    env = {**dict(zip(jaxpr.constvars, consts)), **dict(zip(jaxpr.invars, args))}

    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    for index, eqn in enumerate(jaxpr.eqns):
      site = prefix + (index,)
      invals = [read(v) for v in eqn.invars]
      for c in consumers.get(site, ()):
        invals[c.operand] = _apply_mask(graph, invals[c.operand], c, masks)
      for operand, axis, layouts, group in recorders.get(site, ()):
        if group in offsets:
          invals[operand] = _offset(graph, invals[operand], layouts, axis, group, offsets[group])
        if record:
          z = _activation(graph, invals[operand], layouts, axis, group)
          if group in masks:
            m = jnp.asarray(masks[group], z.dtype)
            z = z * (m[:, None, :] if m.ndim == 2 else m)
          recorded[group] = z
      if eqn.primitive.name in jaxpr_lib._CALLS:
        body, inner_consts = jaxpr_lib.call_body(eqn)
        outs = run(body, cut(inner_consts, site), invals, site)
      else:
        params = eqn.params if kept is None else _rewrite(graph, eqn, site, invals, kept)
        outs = eqn.primitive.bind(*invals, **params)
        if not eqn.primitive.multiple_results:
          outs = [outs]
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  outs = run(graph.jaxpr.jaxpr, cut(graph.jaxpr.consts, ()), list(leaves) + [x], ())
  out = outs[0] if len(outs) == 1 else tuple(outs)
  return (out, recorded) if record else out
