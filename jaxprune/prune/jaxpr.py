"""Channel structure read off a program: `jax.make_jaxpr` of any `apply(variables, x)`.

`Graph` ties every axis of every value to the axes it must keep equal to, through
convolutions, matmuls, broadcasting elementwise ops, reshapes, transposes, tiles, reductions,
concatenations, splits and the call-like primitives (jit, custom_jvp/custom_vjp, checkpoint
and so nn.remat), whose bodies it reads in place. It yields the channel groups, the leaf axes
each indexes, and what `jaxpr_run.evaluate` needs to run the program masked or shrunk.

An axis is a *layout*: a sequence of atoms, each a run of one group's channels. A
concatenation's output is its inputs' layouts end to end (a DenseNet kernel reading the
concatenated stream has an input axis of several groups), a split's input its outputs', a
tiled axis its layout repeated (a tiled size-1 axis, a class token, is a new axis). A grouped
convolution (1 < groups < C_in) ties channel slot j of every group, so all groups lose the
same slots and the group count stays; a depthwise one (groups = C_in = C_out) ties input to
output channels and its group count follows the kept channels. A reshape that merges axes
keeps the minor one's layout, repeated (a flatten before a Dense keeps its conv's channels
prunable); one that splits an axis ties its minor part (heads x head_dim: the same slots of
every head) and the split-off axis is not prunable. Attention (a matmul of two computed
values) ties the heads across query, key, value and output projection, so heads on an axis
of their own are pruned whole; when a constant scales q, k or the scores, the head dimension
keeps its size, since a module recomputes that 1/sqrt(head_dim) from the cut size.

Not prunable (`Group.reason`): axes tied to the input or the output; spatial and
kernel-window axes; axes sliced, padded, gathered from, reduced over (a mean's divisor would
change; over a split axis's minor part, named as the group normalisation it is), cumulated
or merged as a major part by a reshape; a group no convolution or matmul reads (nowhere to
measure or mask it); and by default a *stream*, channels written by several layers where two
computed values meet, summed (a residual) or multiplied (a squeeze-and-excitation or GLU
gate), which shrink only with every block writing them (`prune_streams=True`). A value met
with a function of itself (softmax divided by its own sum) is no meeting. RNG state (PRNG
key leaves, and the `rng_leaves` a caller names: nnx's keys and counts) is no channel.

MACs count every convolution and matmul whose kernel is a variable leaf (also one
transformed without the input: flipped, standardised, weight-normed) and whose results reach
the outputs: an unused head costs nothing, as under jit. A primitive the derivation does
not know, on an otherwise prunable axis, is a `ConfigError` naming it and the leaf to keep
with `fixed`, never a wrong result; so is a program whose shapes depend on data.
"""

import collections
import dataclasses
import itertools
import math
import os
import traceback
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxprune.errors import ConfigError
from jaxprune.prune.structure import LeafKey, Structure

Site = tuple[int, ...]

# One result per operand shape: the output may broadcast size-1 axes of an operand.
_ELEMENTWISE = frozenset("""
    abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp conj copy copy_p
    cos cosh convert_element_type digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt
    imag integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not
    or polygamma population_count pow real reduce_precision rem round rsqrt select_n sign sin
    sinh sqrt square stop_gradient sub tan tanh xor igamma igammac random_gamma_grad
    shift_left shift_right_logical shift_right_arithmetic bitcast_convert_type
    sharding_constraint
    """.split())
_RANDOM = frozenset('random_bits random_wrap random_unwrap random_split random_fold_in '
                    'random_seed random_clone threefry2x32'.split())
_IDENTITIES = frozenset(('optimization_barrier', 'device_put'))
_REDUCTIONS = frozenset('reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or '
                        'reduce_xor argmax argmin'.split())
# What may stand between a feature map and its consumer without changing which values the
# channel holds, only how many (`Graph.record_points`).
_POOLING = frozenset('reduce_window_max reduce_window_sum reduce_window reduce_sum reduce_max '
                     'reshape convert_element_type copy'.split())
_CUMULATIVE = frozenset('cumsum cumprod cummax cummin cumlogsumexp'.split())
# Call-like primitives: {name: the param holding the body}.
_CALLS = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'closed_call': 'call_jaxpr', 'core_call': 'call_jaxpr',
          'custom_jvp_call': 'call_jaxpr', 'custom_vjp_call': 'call_jaxpr',
          'custom_vjp_call_jaxpr': 'fun_jaxpr', 'checkpoint': 'jaxpr', 'remat': 'jaxpr',
          'remat2': 'jaxpr'}  # remat2: jax.checkpoint's (and so nn.remat's) primitive

_INPUT, _OUTPUT, _BATCH = 'the input', 'the output', 'the batch axis'
_WINDOW, _DEPTHWISE_IN = 'a kernel window', 'the input axis of a depthwise kernel'
_RNG = 'RNG state'
# Leaf axes that index no channels: not groups at all.
_NOT_CHANNELS = (_WINDOW, _DEPTHWISE_IN, _RNG)
_STREAM = 'a stream written by several layers (prune_streams=True prunes it with all of them)'
_PRODUCT = ('multiplied elementwise with another computed value (a gate or attention '
            'product; prune_streams=True prunes it with every layer writing either)')
_PRODUCTS = frozenset(('mul', 'div'))
_ATTENTION = ("a head's dimension in attention scaled by a constant (a module recomputes "
              "a 1/sqrt(head_dim) scale from the cut size, and query, key and value share it; "
              "whole heads are pruned instead)")


class Atoms:
  """Union-find over runs of channels ("atoms"), with splitting: `refined[root]` lists the
  atoms a root was split into, and `expand` resolves a layout to unsplit roots, so splitting
  a class splits every axis that uses it."""

  def __init__(self):
    self.parent: list[int] = []
    self.size: list[int] = []
    self.refined: dict[int, list[int]] = {}
    self.reason: dict[int, str] = {}
    self.writers: dict[int, frozenset] = {}
    # Roots whose channels two computed values meet in elementwise: how (_STREAM, _PRODUCT).
    self.joined: dict[int, str] = {}

  def new(self, size: int, reason: str | None = None) -> int:
    atom = len(self.parent)
    self.parent.append(atom)
    self.size.append(int(size))
    if reason:
      self.reason[atom] = reason
    return atom

  def find(self, atom: int) -> int:
    root = atom
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[atom] != root:
      self.parent[atom], atom = root, self.parent[atom]
    return root

  def expand(self, layout: Sequence[int]) -> list[int]:
    # Iterative: a long axis cut channel by channel refines one root thousands deep.
    out, stack = [], list(reversed(layout))
    while stack:
      root = self.find(stack.pop())
      if root in self.refined:
        stack.extend(reversed(self.refined[root]))
      else:
        out.append(root)
    return out

  def _split(self, root: int, at: int) -> tuple[int, int]:
    parts = [self.new(at), self.new(self.size[root] - at)]
    for tags in (self.reason, self.writers, self.joined):
      if root in tags:
        tags.update(dict.fromkeys(parts, tags[root]))
    self.refined[root] = parts
    return parts[0], parts[1]

  def union(self, a: int, b: int):
    a, b = self.find(a), self.find(b)
    if a == b:
      return
    self.parent[b] = a
    for tags in (self.reason, self.joined):
      if b in tags:
        tags.setdefault(a, tags[b])
    self.writers[a] = self.writers.get(a, frozenset()) | self.writers.pop(b, frozenset())

  def unify(self, first: Sequence[int], second: Sequence[int]):
    """Ties two layouts of the same total size channel by channel, splitting atoms as needed."""
    left, right = list(reversed(self.expand(first))), list(reversed(self.expand(second)))
    while left and right:
      a, b = self.find(left.pop()), self.find(right.pop())
      if a in self.refined or b in self.refined:
        # An earlier step of this walk split a root both sides share.
        left.extend(reversed(self.expand([a])))
        right.extend(reversed(self.expand([b])))
        continue
      if self.size[a] > self.size[b]:
        a, rest = self._split(a, self.size[b])
        left.append(rest)
      elif self.size[b] > self.size[a]:
        b, rest = self._split(b, self.size[a])
        right.append(rest)
      self.union(a, b)
    if left or right:
      raise AssertionError('unify: layouts of different sizes.')

  def fix(self, layout: Sequence[int], reason: str):
    for root in self.expand(layout):
      self.reason.setdefault(root, reason)

  def write(self, layout: Sequence[int], writer):
    for root in self.expand(layout):
      self.writers[root] = self.writers.get(root, frozenset()) | {writer}


@dataclasses.dataclass
class Consumer:
  """An operand whose `axes` a convolution or matmul contracts: where masks multiply."""
  site: Site
  operand: int
  axes: tuple[int, ...]
  layouts: tuple[tuple[int, ...], ...]  # the layouts of all the operand's axes
  primitive: str


@dataclasses.dataclass(frozen=True)
class Group:
  """One channel group, named after the layer that writes it (else the first leaf it indexes)."""
  name: str
  width: int
  prunable: bool  # whether masks and shrinking may remove its channels
  reason: str | None  # why not, when it is not prunable
  # (leaf, axis, offset) for every place a leaf axis holds the group's channels (several per
  # axis for a concatenation or a grouped convolution).
  leaves: tuple[tuple[LeafKey, int, int], ...]


def call_body(eqn) -> tuple[jcore.Jaxpr, list]:
  """The body and constants of a call-like primitive's equation (`_CALLS`)."""
  inner = eqn.params[_CALLS[eqn.primitive.name]]
  return (inner.jaxpr, list(inner.consts)) if hasattr(inner, 'consts') else (inner, [])


def _var_in(v, values) -> bool:
  """Whether `v` is a variable (a literal has no identity) among `values`."""
  return not isinstance(v, jcore.Literal) and v in values


def _leaf_name(key: LeafKey) -> str:
  return '/'.join(str(k) for k in key)


def _user_frame(error: BaseException) -> str:
  """' at FILE:LINE (CODE)' of the innermost frame of the error outside jax, flax and jaxprune."""
  import flax
  import jaxprune
  skip = tuple(os.path.dirname(m.__file__) for m in (jax, np, flax, jaxprune))
  frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(skip)]
  if not frames:
    return ''
  f = frames[-1]
  return f" at {os.path.basename(f.filename)}:{f.lineno} ({(f.line or '').strip()})"


def trace(fn: Callable, leaves: Sequence, x) -> jcore.ClosedJaxpr:
  """make_jaxpr of fn(leaves, x) on shapes only; a data-dependent program is a ConfigError."""
  specs = [jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)) for v in leaves]
  spec_x = jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))
  try:
    return jax.make_jaxpr(fn)(specs, spec_x)
  except (jax.errors.ConcretizationTypeError, jax.errors.NonConcreteBooleanIndexError,
          jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError,
          jax.errors.TracerArrayConversionError) as error:
    first = str(error).strip().splitlines()[0]
    raise ConfigError(f"the model's shapes or control flow depend on the data{_user_frame(error)} "
                      f"({type(error).__name__}: {first}), so its channel structure cannot be "
                      "read from one traced program; use fixed-size operations "
                      "(e.g. jnp.where instead of boolean indexing).") from error


class Graph:
  """The channel structure of one traced program (see the module docstring): `groups`
  ({name: Group}, prunable and not) and, of them, `structure()`, what selection, cost
  counting and the criteria read."""

  def __init__(self, jaxpr: jcore.ClosedJaxpr, leaf_keys: Sequence[LeafKey],
               prune_streams: bool = False, fixed: Sequence[str] = (),
               rng_leaves: Sequence[LeafKey] = (), state_outputs: Mapping[int, int] = {}):
    """`fixed`: substrings of leaf paths whose groups are kept (before unknown primitives
    are refused, so keeping what one reads is the way around it); `rng_leaves`: leaves that
    are RNG state (keys of a PRNG key dtype are recognised without it); `state_outputs`:
    {output index: leaf index} for outputs that are a leaf's new value (a train step's
    BatchNorm statistics), whose axes are that leaf's rather than fixed as outputs."""
    self.jaxpr = jaxpr  # the leaves first, then the input
    self.leaf_keys = tuple(leaf_keys)  # in the jaxpr's argument order
    # By site (an equation's index path through call bodies): the equation, its operands'
    # layouts, which operands are computed from the input, and the producer of each value.
    self.eqns: dict[Site, Any] = {}
    self.in_layouts: dict[Site, list] = {}
    self.dependent: dict[Site, set] = {}
    self.producer: dict[Any, Site] = {}
    # Groups that `structure()` tags although they are not prunable (`name_groups`).
    self.also_tagged: tuple[str, ...] = ()
    self.atoms = Atoms()
    self.out_layouts: dict[Site, list] = {}
    self.const_layouts: dict[Site, list] = {}
    self.consumers: list[Consumer] = []
    self.depthwise: set[Site] = set()
    self.macs: list[tuple[Site, LeafKey, tuple]] = []
    self.unknown: list[tuple[str, Site, list]] = []
    # {atom: groups}: the minor part of an axis a reshape split into that many groups.
    self.grouped: dict[int, int] = {}
    # Products of two computed values as ((layouts, batch axes), twice), and the atoms of
    # computed values multiplied or divided by a constant scalar.
    self.attention: list[tuple] = []
    self.scaled: list[int] = []
    self._walk_top(frozenset(rng_leaves), state_outputs)
    self._finish(prune_streams, tuple(fixed))

  # The walk: layouts for every value, ties between them.

  def _fresh(self, shape, reason=None) -> list[tuple[int, ...]]:
    return [(self.atoms.new(n, reason),) for n in shape]

  def _walk_top(self, rng_leaves: frozenset, state_outputs: Mapping[int, int]):
    jaxpr = self.jaxpr.jaxpr
    self.leaf_layouts = [
        self._fresh(v.aval.shape, _RNG if key in rng_leaves
                    or jax.dtypes.issubdtype(v.aval.dtype, jax.dtypes.prng_key) else None)
        for v, key in zip(jaxpr.invars, self.leaf_keys)]
    x_var = jaxpr.invars[len(self.leaf_keys)]
    x_layouts = self._fresh(x_var.aval.shape, _INPUT)
    self.batch_atom = x_layouts[0][0] if x_layouts else None
    if self.batch_atom is not None:
      self.atoms.reason[self.batch_atom] = _BATCH
    self.const_layouts[()] = [self._fresh(np.shape(c)) for c in self.jaxpr.consts]
    origins = {v: key for v, key in zip(jaxpr.invars, self.leaf_keys)}
    outs = self._walk(jaxpr, self.const_layouts[()], self.leaf_layouts + [x_layouts], (),
                      {x_var}, origins)
    for index, layouts in enumerate(outs):
      if index in state_outputs:
        for layout, leaf_layout in zip(layouts, self.leaf_layouts[state_outputs[index]]):
          self.atoms.unify(layout, leaf_layout)
      else:
        for layout in layouts:
          self.atoms.fix(layout, _OUTPUT)

  def _walk(self, jaxpr: jcore.Jaxpr, const_layouts, in_layouts, prefix: Site,
            depends: set, origins: dict) -> list:
    """Walks one jaxpr; `depends` holds its values computed from the input, `origins` maps
    values computed from a variable leaf alone (up to dtype, layout and smaller or constant
    operands) to that leaf."""
    env = {**dict(zip(jaxpr.constvars, const_layouts)), **dict(zip(jaxpr.invars, in_layouts))}

    def read(v):
      return self._fresh(np.shape(v.val)) if isinstance(v, jcore.Literal) else env[v]

    for index, eqn in enumerate(jaxpr.eqns):
      site = prefix + (index,)
      ins = [read(v) for v in eqn.invars]
      dep = {i for i, v in enumerate(eqn.invars) if _var_in(v, depends)}
      self.eqns[site], self.in_layouts[site], self.dependent[site] = eqn, ins, dep
      self.producer.update(dict.fromkeys(eqn.outvars, site))
      if eqn.primitive.name in _CALLS:
        body, body_consts = call_body(eqn)
        consts = self.const_layouts[site] = [self._fresh(np.shape(c)) for c in body_consts]
        inner_depends = {bv for i, bv in enumerate(body.invars) if i in dep}
        inner_origins = {bv: origins[ov] for bv, ov in zip(body.invars, eqn.invars)
                         if _var_in(ov, origins)}
        outs = self._walk(body, consts, ins, site, inner_depends, inner_origins)
        origins.update({ov: inner_origins[bv] for ov, bv in zip(eqn.outvars, body.outvars)
                        if _var_in(bv, inner_origins)})
        depends.update(ov for ov, bv in zip(eqn.outvars, body.outvars)
                       if _var_in(bv, inner_depends))
      else:
        outs = self._rule(eqn, ins, site, dep, origins)
        if dep:
          depends.update(eqn.outvars)
        else:
          # A kernel flipped, standardised or weight-normed is still that leaf's kernel: the
          # one leaf among the operands of the result's size.
          for ov in eqn.outvars:
            leaves = {origins[v] for v in eqn.invars
                      if _var_in(v, origins) and v.aval.size == ov.aval.size}
            if len(leaves) == 1:
              origins[ov] = leaves.pop()
      self.out_layouts[site] = outs
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  def _rule(self, eqn, ins, site: Site, dep: set, origins: dict) -> list:
    """The ties one primitive makes; returns its outputs' layouts."""
    a = self.atoms
    name, params = eqn.primitive.name, eqn.params
    shapes = [tuple(np.shape(v.aval)) if hasattr(v, 'aval') else () for v in eqn.invars]
    out_shapes = [tuple(v.aval.shape) for v in eqn.outvars]

    if name in _ELEMENTWISE:
      out_shape = out_shapes[0]
      outs = self._fresh(out_shape)
      # Per operand, the axes the output keeps at their size (the others broadcast).
      same = [[(axis, layout) for axis, (layout, size) in enumerate(zip(layouts, shape))
               if size == out_shape[axis]] if len(shape) == len(out_shape) else []
              for layouts, shape in zip(ins, shapes)]
      # The computed operands' channels before this op ties them: a value met with a function
      # of itself (softmax divided by its own sum) is one set of channels, not two values.
      meeting = collections.defaultdict(set)
      for i in dep:
        for axis, layout in same[i]:
          meeting[axis].add(tuple(a.expand(layout)))
      for axis, layout in itertools.chain(*same):
        a.unify(outs[axis], layout)
      for axis, channels in meeting.items():
        if len(channels) >= 2:
          for root in a.expand(outs[axis]):
            a.joined.setdefault(root, _PRODUCT if name in _PRODUCTS else _STREAM)
      if name in _PRODUCTS and len(dep) == 1 and any(
          math.prod(shape) == 1 and i not in dep and not _var_in(v, origins)
          for i, (v, shape) in enumerate(zip(eqn.invars, shapes))):
        self.scaled.extend(atom for layout in ins[next(iter(dep))] for atom in layout)
      return [outs] * len(eqn.outvars)

    if name in _IDENTITIES:
      return list(ins)

    if name in _RANDOM:
      # Fresh keys or bits: bits that meet an activation (a dropout mask) are tied to it there.
      return [self._fresh(shape) for shape in out_shapes]

    if name == 'broadcast_in_dim':
      outs = self._fresh(out_shapes[0])
      for axis, dim in enumerate(params['broadcast_dimensions']):
        if shapes[0][axis] == out_shapes[0][dim]:
          a.unify(outs[dim], ins[0][axis])
      return [outs]

    if name == 'tile':
      # out[i] = in[i % n]; a tiled size-1 axis (a class token over the batch) is a broadcast.
      return [[(a.new(reps),) if size == 1 and reps > 1 else tuple(layout) * reps
               for layout, size, reps in zip(ins[0], shapes[0], params['reps'])]]

    if name in ('reshape', 'expand_dims'):
      return [self._reshape(ins[0], shapes[0], out_shapes[0])]

    if name == 'transpose':
      return [[ins[0][p] for p in params['permutation']]]

    if name == 'squeeze':
      dims = {d % len(shapes[0]) for d in params['dimensions']}
      return [[l for i, l in enumerate(ins[0]) if i not in dims]]

    if name in _REDUCTIONS:
      axes = set(params['axes'])
      for axis in axes:
        a.fix(ins[0][axis], self._reduced_reason(name, ins[0][axis]))
      return [[l for i, l in enumerate(ins[0]) if i not in axes]]

    if name in _CUMULATIVE:
      a.fix(ins[0][params['axis']], f'cumulated by {name}')
      return [ins[0]]

    if name == 'concatenate':
      dim = params['dimension']
      outs = []
      for axis in range(len(out_shapes[0])):
        if axis == dim:
          outs.append(tuple(atom for layouts in ins for atom in layouts[axis]))
        else:
          for layouts in ins[1:]:
            a.unify(ins[0][axis], layouts[axis])
          outs.append(ins[0][axis])
      return [outs]

    if name in ('pad', 'slice', 'dynamic_slice', 'dynamic_update_slice', 'rev', 'reduce_window',
                'reduce_window_sum', 'reduce_window_max', 'reduce_window_min', 'cumsum_window',
                'argmax_window'):
      return [self._window_like(name, eqn, ins, shapes, out_shapes[0])]

    if name == 'iota':
      outs = self._fresh(out_shapes[0])
      a.fix(outs[params['dimension']], 'counted by iota')
      return [outs]

    if name == 'gather':
      return [self._gather(eqn, ins, shapes, out_shapes[0])]

    if name == 'dot_general':
      return [self._dot(eqn, ins, shapes, out_shapes[0], site, dep, origins)]

    if name == 'conv_general_dilated':
      return [self._conv(eqn, ins, shapes, out_shapes[0], site, origins)]

    if name == 'split':
      # The inverse of concatenate: the input axis is its pieces' layouts end to end.
      axis = params['axis']
      outs = [self._fresh(shape) for shape in out_shapes]
      for i in range(len(shapes[0])):
        if i == axis:
          a.unify(ins[0][i], tuple(atom for layouts in outs for atom in layouts[i]))
        else:
          for layouts in outs:
            a.unify(layouts[i], ins[0][i])
      return outs

    outs = [self._fresh(shape, f'produced by {name}') for shape in out_shapes]
    self.unknown.append((name, site, list(ins) + outs))
    return outs

  def _reshape(self, layouts, in_shape, out_shape) -> list:
    """Aligns blocks of equal size; within a block the minor axis keeps its layout."""
    a = self.atoms
    outs = [None] * len(out_shape)
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
      if j < len(out_shape) and out_shape[j] == 1:
        outs[j] = (a.new(1),)
        j += 1
        continue
      if i < len(in_shape) and in_shape[i] == 1:
        i += 1
        continue
      block_in, block_out = [i], [j]
      n_in, n_out = in_shape[i], out_shape[j]
      i, j = i + 1, j + 1
      while n_in != n_out:
        if n_in < n_out:
          block_in.append(i)
          n_in *= in_shape[i]
          i += 1
        else:
          block_out.append(j)
          n_out *= out_shape[j]
          j += 1
      for axis in block_in[:-1]:
        a.fix(layouts[axis], 'merged into a larger axis by reshape')
      merged = tuple(layouts[block_in[-1]]) * math.prod(in_shape[k] for k in block_in[:-1])
      minor = a.new(out_shape[block_out[-1]])
      a.unify(merged, (minor,) * (n_out // out_shape[block_out[-1]]))
      for axis in block_out[:-1]:
        outs[axis] = (a.new(out_shape[axis], 'split off an axis by reshape'),)
      if len(block_out) > 1:
        self.grouped[minor] = n_out // out_shape[block_out[-1]]
      outs[block_out[-1]] = (minor,)
    return outs

  def _tie_or_fix(self, out, layout, whole: bool, reason: str):
    """Ties an output axis to its operand's axis when that is kept whole, else fixes both."""
    if whole:
      self.atoms.unify(out, layout)
    else:
      self.atoms.fix(layout, reason)
      self.atoms.fix(out, reason)

  def _reduced_reason(self, name, layout) -> str:
    """Why an axis reduced over is fixed, naming a group normalisation when it is one."""
    roots = self.atoms.expand(layout)
    for atom, groups in self.grouped.items():
      if self.atoms.expand((atom,)) == roots:
        size = self.atoms.size[roots[0]]
        return (f'averaged in groups of {size}, as GroupNorm({groups}) of {groups * size} '
                f'channels does (a reshape splits the axis into {groups} groups and {name} '
                'reduces over each)')
    return f'reduced over by {name}'

  def _window_like(self, name, eqn, ins, shapes, out_shape) -> list:
    """pad, slices, rev and pooling windows: axes kept whole tie, others fix."""
    a, params, shape = self.atoms, eqn.params, shapes[0]
    outs = self._fresh(out_shape)
    for axis in range(len(out_shape)):
      if name == 'pad':
        whole = tuple(params['padding_config'][axis]) == (0, 0, 0)
      elif name == 'slice':
        stride = (params['strides'] or (1,) * len(shape))[axis]
        whole = (params['start_indices'][axis] == 0 and params['limit_indices'][axis] == shape[axis]
                 and stride == 1)
      elif name == 'dynamic_update_slice':
        whole = shapes[1][axis] == shape[axis]
        if whole:
          a.unify(ins[1][axis], ins[0][axis])
        else:
          a.fix(ins[1][axis], 'written into part of an axis by dynamic_update_slice')
      elif name == 'rev':
        whole = axis not in params['dimensions']
      elif 'window' in name:
        whole = (params['window_dimensions'][axis] == 1 and params['window_strides'][axis] == 1
                 and tuple(params['padding'][axis]) == (0, 0) and shape[axis] == out_shape[axis])
      else:
        whole = out_shape[axis] == shape[axis]
      verb = 'pooled' if 'window' in name else 'cut'
      self._tie_or_fix(outs[axis], ins[0][axis], whole, f'{verb} by {name}')
    return outs

  def _gather(self, eqn, ins, shapes, out_shape) -> list:
    """jnp.take and indexing: gathered operand axes fix; the rest tie to the output or indices."""
    a, params = self.atoms, eqn.params
    dn = params['dimension_numbers']
    outs = self._fresh(out_shape)
    for axis in dn.start_index_map:
      a.fix(ins[0][axis], 'indexed by gather')
    kept = [d for d in range(len(shapes[0]))
            if d not in dn.collapsed_slice_dims and d not in getattr(dn, 'operand_batching_dims', ())]
    for out_axis, d in zip(dn.offset_dims, kept):
      self._tie_or_fix(outs[out_axis], ins[0][d], params['slice_sizes'][d] == shapes[0][d],
                       'cut by gather')
    batch_out = [d for d in range(len(out_shape)) if d not in dn.offset_dims]
    for out_axis, d in zip(batch_out, range(len(shapes[1]) - 1)):
      a.unify(outs[out_axis], ins[1][d])
    return outs

  def _dot(self, eqn, ins, shapes, out_shape, site, dep, origins) -> list:
    a = self.atoms
    (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
    lhs, rhs = ins
    for i, j in zip(lc, rc):
      a.unify(lhs[i], rhs[j])
    outs = []
    for i, j in zip(lb, rb):
      a.unify(lhs[i], rhs[j])
      outs.append(lhs[i])
    lhs_free = [i for i in range(len(lhs)) if i not in lc and i not in lb]
    rhs_free = [j for j in range(len(rhs)) if j not in rc and j not in rb]
    outs += [lhs[i] for i in lhs_free] + [rhs[j] for j in rhs_free]
    if len(dep) == 2:
      self.attention.append(((lhs, lb), (rhs, rb)))
    lhs_var, rhs_var = eqn.invars
    # Mask the operand computed from the input (the activation), the lhs when both are.
    operand = 1 if dep == {1} else 0
    axes = tuple((lc, rc)[operand])
    self.consumers.append(Consumer(site, operand, axes, tuple(ins[operand]), 'dot_general'))
    for weight, layouts, free, other, other_free in ((rhs_var, rhs, rhs_free, lhs, lhs_free),
                                                     (lhs_var, lhs, lhs_free, rhs, rhs_free)):
      if _var_in(weight, origins):
        for k in free:
          a.write(layouts[k], site)
        self.macs.append((site, origins[weight], tuple(other[k] for k in other_free)))
        break
    return outs

  def _conv(self, eqn, ins, shapes, out_shape, site, origins) -> list:
    a, params = self.atoms, eqn.params
    lhs_spec, rhs_spec, out_spec = params['dimension_numbers']
    lhs, rhs = ins
    groups = params['feature_group_count']
    if params['batch_group_count'] != 1:
      self.unknown.append(('conv_general_dilated with batch_group_count > 1', site,
                           [lhs, rhs]))
    outs = self._fresh(out_shape)
    a.unify(outs[out_spec[0]], lhs[lhs_spec[0]])
    for d in rhs_spec[2:]:
      # No channels, whatever else read them first (a standardisation's statistics).
      for r in a.expand(rhs[d]):
        a.reason[r] = _WINDOW
    for d in out_spec[2:]:
      a.fix(outs[d], 'spatial')
    c_in, c_out = shapes[0][lhs_spec[1]], out_shape[out_spec[1]]
    lhs_c, rhs_i, out_c = lhs[lhs_spec[1]], rhs[rhs_spec[1]], outs[out_spec[1]]
    a.unify(rhs[rhs_spec[0]], out_c)
    if groups == 1:
      a.unify(lhs_c, rhs_i)
    elif groups == c_in and c_out == c_in:
      a.unify(lhs_c, out_c)
      a.fix(rhs_i, _DEPTHWISE_IN)
      self.depthwise.add(site)
    elif groups == c_in:
      for layout in (lhs_c, rhs_i, out_c):
        a.fix(layout, 'read by a depthwise convolution with a channel multiplier')
    else:
      # Channel slot j of every group is one set of channels.
      a.unify(lhs_c, tuple(rhs_i) * groups)
      a.unify(out_c, (a.new(c_out // groups),) * groups)
    if site not in self.depthwise:
      self.consumers.append(Consumer(site, 0, (lhs_spec[1],), tuple(lhs), 'conv_general_dilated'))
      a.write(out_c, site)
    kernel = eqn.invars[1]
    if _var_in(kernel, origins):
      self.macs.append((site, origins[kernel], tuple(outs[d] for d in out_spec[2:])))
    return outs

  # From atoms to groups.

  def _finish(self, prune_streams: bool, fixed: tuple[str, ...]):
    a = self.atoms
    scaled = {r for atom in self.scaled for r in a.expand((atom,))}
    for operands in self.attention:
      open_roots = {r for layouts, _ in operands for layout in layouts
                    for r in a.expand(layout) if r not in a.reason}
      if open_roots & scaled:
        for layouts, batch in operands:
          for axis, layout in enumerate(layouts):
            if axis not in batch:
              a.fix(layout, _ATTENTION)
    if not prune_streams:
      for root in set(a.writers) | set(a.joined):
        r = a.find(root)
        if r not in a.refined and r in a.joined and len(a.writers.get(r, ())) >= 2:
          a.reason.setdefault(r, a.joined[r])
    self.leaf_roots = [[a.expand(layout) for layout in layouts] for layouts in self.leaf_layouts]
    places = collections.defaultdict(list)  # {root: [(leaf, axis, offset)]}
    for key, axes in zip(self.leaf_keys, self.leaf_roots):
      for axis, roots in enumerate(axes):
        offsets = itertools.accumulate((a.size[r] for r in roots), initial=0)
        for r, offset in zip(roots, offsets):
          places[r].append((key, axis, offset))
    # In program order: by the first layer writing the group, then by leaf order.
    first_site = {r: min(a.writers[r]) for r in places if a.writers.get(r)}
    order = sorted(places, key=lambda r: (0, first_site[r]) if r in first_site else (1,))
    places = {r: places[r] for r in order if a.reason.get(r) not in _NOT_CHANNELS}
    # Named after the first layer that writes it (its kernel's leaf), else its first leaf.
    writer_leaf = {}
    for site, key, _ in self.macs:
      for roots in self.leaf_roots[self.leaf_keys.index(key)]:
        for r in roots:
          if site in a.writers.get(r, ()):
            writer_leaf.setdefault(r, key)
    names, used = {}, collections.Counter()
    for r, where in places.items():
      base_key = writer_leaf.get(r, where[0][0])
      base = _leaf_name(base_key[1:-1] if len(base_key) > 2 else base_key)
      used[base] += 1
      names[r] = base if used[base] == 1 else f'{base}:{used[base] - 1}'
      hit = next((p for p in fixed for key, _, _ in where if p in _leaf_name(key)), None)
      if hit is not None:
        a.reason.setdefault(r, f'kept by fixed={hit!r}')

    open_roots = {r for r in places if r not in a.reason}
    for name, site, operands in self.unknown:
      for layout in (layout for layouts in operands for layout in layouts):
        for r in a.expand(layout):
          if r in open_roots:
            # A kernel names the layer best; the advice names the leaf indexing the fewest
            # other open groups, so following it keeps no more than these channels.
            key, axis, _ = min(places[r], key=lambda p: p[0][-1] != 'kernel')
            leaf = min((k for k, _, _ in places[r]), key=lambda k: (
                len({q for roots in self.leaf_roots[self.leaf_keys.index(k)] for q in roots}
                    & open_roots - {r}), k[-1] != 'kernel'))
            raise ConfigError(
                f"primitive {name} reads the channels of {_leaf_name(key)} (axis {axis}), and "
                "jaxprune cannot tell which channels it ties together; rewrite that part of "
                "the model with supported operations, or keep those channels with "
                f"fixed=[{_leaf_name(leaf)!r}].")
    consumed = {r for c in self.consumers for axis in c.axes for r in a.expand(c.layouts[axis])}
    self.names = names
    self.groups = {}
    for r, where in places.items():
      reason = a.reason.get(r)
      if reason is None and r not in consumed:
        reason = 'no convolution or matmul reads it'
      self.groups[names[r]] = Group(names[r], a.size[r], reason is None, reason, tuple(where))
    self.root_of = {n: r for r, n in names.items()}

  @property
  def prunable(self) -> tuple[str, ...]:
    return tuple(n for n, g in self.groups.items() if g.prunable)

  def name_groups(self, layers: Mapping[str, str], prunable: Sequence[str], model: str):
    """Gives groups the names a model declares: `layers` maps each of its width names to a
    layer (a leaf path under a collection) whose leaves' last axis holds that group's
    channels; only the groups in `prunable` stay prunable, and the others named are tagged
    in `structure()` too. A declared layer that writes no group, or a declared prunable
    group the program cannot prune, is the model's bug (ValueError)."""
    writes = {}
    for name, group in self.groups.items():
      for key, axis, _ in group.leaves:
        if axis == len(self.leaf_layouts[self.leaf_keys.index(key)]) - 1:
          for end in range(2, len(key)):
            writes.setdefault(_leaf_name(key[1:end]), name)
    renamed = {}
    for width_name, layer in layers.items():
      found = writes.get(layer)
      if found is None:
        raise ValueError(f"{model} declares layer {layer!r} for group {width_name!r}, but "
                         "that layer writes no channel group of its program.")
      renamed[found] = width_name
    groups = {}
    for name, group in self.groups.items():
      new = renamed.get(name, name)
      if group.prunable and new not in prunable:
        group = dataclasses.replace(group, prunable=False,
                                    reason=f'not one of the prunable groups of {model}')
      groups[new] = dataclasses.replace(group, name=new)
    lost = [g for g in prunable if g not in groups or not groups[g].prunable]
    if lost:
      raise ValueError(f"{model} declares groups {lost} prunable, but its program cannot "
                       f"prune them: {[groups[g].reason for g in lost if g in groups]}.")
    # The model's order of its widths, which the random criterion and selection's ties follow.
    order = [g for g in layers if g in groups] + [g for g in groups if g not in layers]
    self.groups = {g: groups[g] for g in order}
    self.names = {r: renamed.get(n, n) for r, n in self.names.items()}
    self.root_of = {n: r for r, n in self.names.items()}
    self.also_tagged = tuple(g for g in layers if g not in prunable)

  def record_points(self) -> dict[str, tuple[Site, int, int, tuple]]:
    """{group: (site, operand, axis, layouts)}: where each prunable group's activation is
    read: its first consumer's operand, walked back through what only pools, reshapes or
    rescales it, so after normalisation and nonlinearity but before pooling. Gate gradients
    are unchanged by the walk, since those ops pass z * dL/dz through summed."""
    points = {}
    for c in self.consumers:
      for axis in c.axes:
        for r in self.atoms.expand(c.layouts[axis]):
          name = self.names.get(r)
          if name is None or not self.groups[name].prunable or name in points:
            continue
          site, operand = c.site, c.operand
          while True:
            var = self.eqns[site].invars[operand]
            if not _var_in(var, self.producer) or not self._pools(self.producer[var]):
              break
            site, operand = self.producer[var], 0
          layouts = tuple(self.in_layouts[site][operand])
          where = next(i for i, l in enumerate(layouts) if r in self.atoms.expand(l))
          points[name] = (site, operand, where, layouts)
    return points

  def _pools(self, site: Site) -> bool:
    """Whether the equation at `site` only pools, reshapes or rescales its first operand."""
    name = self.eqns[site].primitive.name
    if name in _PRODUCTS:
      # A rescale by a constant (an average's divisor), not a product with computed values.
      return self.dependent[site] == {0}
    return name in _POOLING

  def structure(self) -> Structure:
    """The `Structure` of the prunable groups (virtual leaves for axes holding several)."""
    a = self.atoms
    tagged = self.prunable + tuple(n for n in self.also_tagged if n not in self.prunable)
    prunable = {self.root_of[n]: n for n in tagged}
    axes, shapes, positions, pieces_of = {}, {}, collections.Counter(), {}
    for key, leaf_roots in zip(self.leaf_keys, self.leaf_roots):
      per_axis = []
      for roots in leaf_roots:
        merged, offset = [], 0
        for r in roots:
          size, tag = a.size[r], prunable.get(r)
          # Neighbouring pieces of no prunable group are one constant piece.
          if merged and tag is None and merged[-1][2] is None:
            merged[-1] = (merged[-1][0], merged[-1][1] + size, None)
          else:
            merged.append((offset, size, tag))
          offset += size
        per_axis.append(merged)
      split = any(len(p) > 1 for p in per_axis)
      for combo in itertools.product(*per_axis):
        spec = ','.join(f'{s}:{s + n}' for s, n, _ in combo)
        vkey = key[:-1] + (f'[{spec}]', key[-1]) if split else key
        axes[vkey] = tuple(t for _, _, t in combo)
        shapes[vkey] = tuple(n for _, n, _ in combo)
        pieces_of.setdefault(key, []).append((vkey, tuple(slice(s, s + n) for s, n, _ in combo)))
    batch = a.find(self.batch_atom) if self.batch_atom is not None else None
    live = _live_sites(self.jaxpr.jaxpr, (), [True] * len(self.jaxpr.jaxpr.outvars))[0]
    for site, key, layouts in self.macs:
      if site not in live:
        continue
      per_example = math.prod(sum(a.size[r] for r in a.expand(l)) for l in layouts
                              if a.expand(l) != [batch])
      for vkey, _ in pieces_of[key]:
        positions[vkey] += per_example
    self.pieces_of = pieces_of
    return Structure(widths={n: self.groups[n].width for n in tagged},
                     prunable=self.prunable, axes=axes, shapes=shapes, positions=dict(positions))

  def virtual_leaves(self, flat: Mapping[LeafKey, Any]) -> dict[LeafKey, Any]:
    """The leaves of `structure()`: the real ones, split into pieces where it splits them."""
    if not hasattr(self, 'pieces_of'):
      self.structure()
    # A leaf in one piece passes as it is: an RNG key has no numpy form.
    return {vkey: np.asarray(flat[key])[index] if len(pieces) > 1 else flat[key]
            for key, pieces in self.pieces_of.items() for vkey, index in pieces}

  # Channel indices for masks and shrinking.

  def pieces(self, layout, per_group: Mapping[str, Any]) -> list[tuple[int, Any]]:
    """(size, per_group[group] or None) for every atom of an axis of `layout`: None where
    the atom is no prunable group that `per_group` names."""
    pieces = []
    for r in self.atoms.expand(layout):
      name = self.names.get(r)
      named = name in per_group and self.groups[name].prunable
      pieces.append((self.atoms.size[r], per_group[name] if named else None))
    return pieces

  def kept_positions(self, layout, kept: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Indices along an axis of `layout` that survive `kept`; None when all do."""
    positions, offset, changed = [], 0, False
    for size, k in self.pieces(layout, kept):
      positions.append(offset + (np.arange(size) if k is None else np.asarray(k)))
      changed |= k is not None and len(k) != size
      offset += size
    return np.concatenate(positions).astype(np.int32) if changed else None

  def new_size(self, layout, kept: Mapping[str, np.ndarray]) -> int:
    return sum(size if k is None else len(k) for size, k in self.pieces(layout, kept))

  def batch_axis(self, layouts) -> int | None:
    if self.batch_atom is None:
      return None
    batch = [self.atoms.find(self.batch_atom)]
    return next((i for i, l in enumerate(layouts) if self.atoms.expand(l) == batch), None)


def _live_sites(jaxpr: jcore.Jaxpr, prefix: Site, needed: Sequence[bool]):
  """The sites of the equations whose results reach the `needed` outputs (what jit keeps:
  an unused head costs nothing), and which of the jaxpr's inputs they read."""
  live = {v for v, n in zip(jaxpr.outvars, needed) if n and not isinstance(v, jcore.Literal)}
  sites = set()
  for index in reversed(range(len(jaxpr.eqns))):
    eqn = jaxpr.eqns[index]
    if not eqn.effects and not any(v in live for v in eqn.outvars):
      continue
    site = prefix + (index,)
    sites.add(site)
    reads = eqn.invars
    if eqn.primitive.name in _CALLS:
      inner_sites, used = _live_sites(call_body(eqn)[0], site, [v in live for v in eqn.outvars])
      sites |= inner_sites
      reads = [v for v, u in zip(eqn.invars, used) if u]
    live.update(v for v in reads if not isinstance(v, jcore.Literal))
  return sites, [v in live for v in jaxpr.invars]


def slice_leaf(value, layouts, graph: Graph, kept: Mapping[str, np.ndarray]):
  """A leaf (or a constant of the program) with every axis cut to its kept channels; a leaf
  with none cut (RNG state among them) is returned as it is."""
  for axis, layout in enumerate(layouts):
    index = graph.kept_positions(layout, kept)
    if index is not None:
      value = np.take(np.asarray(value), index, axis=axis)
  return value
