"""Model -> program -> structure: a model's traced program and the channel groups read off it.

`derive(model, image_shape)`, the one structure derivation, traces the model's training
step, `apply(variables, x, train=True) -> (logits, new BatchNorm statistics)`, with
`jax.make_jaxpr` (shapes only) and reads its groups with `jaxpr.Graph`; the new statistics
are tied to the leaves they replace, so a BatchNorm's running mean and variance index their
channels like its scale does. The criteria run the model traced in evaluation mode at a
batch's shape (`Program.apply`).

Built-in models name their groups (`group_layers()`: each width name to a layer writing its
channels, so groups carry the names widths, presets and results use) and choose the pruned
ones (`prunable_groups()`). The program is traced with conv_impl='native' and
batch_norm='flax': the faster formulations compute the same function with the same
variables, but the CPU convolution rule reads a kernel element at run time, which a program
would show as a cut.

An own model (`models.own.OwnModel`) names its groups after its layers' paths. Pruned, it
has no class to rebuild at other widths: it runs its full program on the cut variables with
every shape rewritten (`run_pruned`), and a fresh pruned network starts from `fresh_init`.
"""

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxprune import models
from jaxprune.errors import ConfigError
from jaxprune.kernels.options import PerformanceOptions
from jaxprune.models import own
from jaxprune.prune import jaxpr as jaxpr_lib, jaxpr_run, shrink
from jaxprune.prune.structure import LeafKey, Structure


@dataclasses.dataclass(eq=False)
class Program:
  """A model's program and structure (`derive`, or `from_function` for a `Pruner`).

  Hashed by identity, so a criterion's jitted accumulator compiles once per program.
  """
  model: nn.Module  # as configured (its performance options are the ones it trains with)
  structure: Structure  # of its width groups, prunable and not
  graph: jaxpr_lib.Graph  # the training program's
  leaf_keys: tuple[LeafKey, ...]  # collection first, in the programs' argument order
  xla_options: str  # the compiler option set the criteria's jitted programs use
  graph_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  _graphs: dict = dataclasses.field(default_factory=dict)

  def leaves_of(self, variables) -> list:
    flat = traverse_util.flatten_dict(dict(variables))
    return [flat[k] for k in self.leaf_keys]

  def leaf_view(self, variables) -> dict:
    """The variables as `structure` names its leaves: an axis holding several groups (a
    concatenation's reader) split into one virtual leaf per piece."""
    flat = traverse_util.flatten_dict(dict(variables))
    return traverse_util.unflatten_dict(self.graph.virtual_leaves(flat))

  def graph_for(self, x, train: bool = False, leaves=None) -> jaxpr_lib.Graph:
    """The program for inputs shaped like x, in training or evaluation mode, on the full
    model's leaves (in the dtypes of `leaves` when given): traced once per signature, with
    the groups of the program the structure was read from."""
    full = self.graph.jaxpr.in_avals[:len(self.leaf_keys)]
    dtypes = ([jnp.result_type(v) for v in leaves] if leaves is not None
              else [a.dtype for a in full])
    specs = [jax.ShapeDtypeStruct(a.shape, d) for a, d in zip(full, dtypes)]
    signature = (tuple(np.shape(x)), str(jnp.result_type(x)), train, tuple(map(str, dtypes)))
    if signature not in self._graphs:
      graph = _trace(self.model, specs, x, train, self.leaf_keys, self.graph_options)
      widths = {g: graph.groups[g].width for g in graph.prunable}
      if widths != {g: self.structure.widths[g] for g in self.structure.prunable}:
        name = getattr(self.model, 'spec', None) or type(self.model).__name__
        raise ValueError(f"{name}'s program at input shape {np.shape(x)} has other prunable "
                         f"groups ({widths}) than at the shape it was derived at.")
      self._graphs[signature] = graph
    return self._graphs[signature]

  def apply(self, variables, x, train: bool = False, masks: Mapping | None = None,
            mutable=None, offsets: Mapping | None = None):
    """The evaluation program, Linen-style: masks ({group: (C,) or (B, C)}) at every
    consumer; with 'intermediates' in `mutable`, also the activations at the record points
    as `(logits, {'intermediates': {group: (activation,)}})`; `offsets` added there."""
    del train  # Criteria score the deployed network: evaluation mode.
    masks = shrink.check_masks(self.structure, masks, batch=np.shape(x)[0])
    leaves = self.leaves_of(variables)
    graph = self.graph_for(x, leaves=leaves)
    if mutable and 'intermediates' in mutable:
      out, acts = jaxpr_run.evaluate(graph, leaves, x, masks=masks, record=True,
                                     offsets=offsets)
      return out, {'intermediates': {g: (a,) for g, a in acts.items()}}
    return jaxpr_run.evaluate(graph, leaves, x, masks=masks, offsets=offsets)


def _trace(model, leaf_specs, x, train: bool, keys, options: Mapping) -> jaxpr_lib.Graph:
  """The model's program in one mode, as a Graph named by the model's declarations (in
  training mode it returns the new 'batch_stats' after the logits)."""
  traced = model
  if isinstance(model, nn.Module) and hasattr(model, 'performance'):
    traced = model.clone(performance=PerformanceOptions(
        conv_impl='native', batch_norm='flax', xla_options=model.performance.xla_options))
  state = [i for i, k in enumerate(keys) if k[0] == own.STATE]

  def fn(leaves, x):
    variables = traverse_util.unflatten_dict(dict(zip(keys, leaves)))
    if not train:
      return traced.apply(variables, x, train=False)
    logits, updated = traced.apply(variables, x, train=True, mutable=[own.STATE])
    new = traverse_util.flatten_dict({own.STATE: updated.get(own.STATE, {})})
    return (logits, *[new[keys[i]] for i in state])

  graph = jaxpr_lib.Graph(jaxpr_lib.trace(fn, leaf_specs, x), keys, **options,
                          state_outputs={1 + n: i for n, i in enumerate(state)} if train else {})
  if hasattr(model, 'group_layers'):
    graph.name_groups(model.group_layers(), model.prunable_groups(), type(model).__name__)
  return graph


def _program(model, flat: Mapping, x, train: bool, options: Mapping, xla_options: str) -> Program:
  """The Program of `model` traced on the leaves `flat` ({key: array or spec}) and x."""
  keys = tuple(flat)
  graph = _trace(model, [flat[k] for k in keys], x, train, keys, options)
  return Program(model=model, structure=graph.structure(), graph=graph, leaf_keys=keys,
                 xla_options=xla_options, graph_options=options)


@functools.lru_cache(maxsize=64)
def derive(model: nn.Module, image_shape=(32, 32, 3)) -> Program:
  """The program of `model` (a built-in model built at its widths, or an own model at its
  full width) for (H, W, C) images."""
  flat = traverse_util.flatten_dict(dict(models.init_shapes(model, image_shape)))
  x = jax.ShapeDtypeStruct((2,) + tuple(image_shape), jnp.float32)
  options = {'rng_leaves': model.rng_leaves()} if isinstance(model, own.OwnModel) else {}
  performance = getattr(model, 'performance', PerformanceOptions())
  return _program(model, flat, x, True, options, performance.xla_options)


def from_function(model, variables, x, **options) -> Program:
  """The program of any model called Linen-style, `model.apply(variables, x, train=False)`,
  read in evaluation mode at x's shape (`jaxprune.Pruner`'s). `options` go to `jaxpr.Graph`
  (prune_streams, fixed, rng_leaves)."""
  return _program(model, traverse_util.flatten_dict(dict(variables)), x, False, options,
                  PerformanceOptions().xla_options)


def run_pruned(model: own.OwnModel, variables, x, *, train: bool, mutable: bool):
  """A pruned own model's forward pass: its full program, run on the cut variables with
  every shape rewritten for the kept channels (`jaxpr_run.evaluate`). With `mutable`,
  also returns {'batch_stats': new state}, as `OwnModel.apply` does."""
  prog = derive(model.full(), tuple(model.image_shape))
  leaves = prog.leaves_of(variables)
  graph = prog.graph_for(x, train=train, leaves=leaves)
  out = jaxpr_run.evaluate(graph, leaves, x, kept=model.kept_indices())
  if not train:
    return (out, {own.STATE: dict(variables).get(own.STATE, {})}) if mutable else out
  logits, *new = out
  if not mutable:
    return logits
  state = [k[1:] for k in prog.leaf_keys if k[0] == own.STATE]
  return logits, {own.STATE: traverse_util.unflatten_dict(dict(zip(state, new)))}


def fresh_init(model, rng, image_shape) -> dict:
  """A fresh initialisation of a pruned own model (`model.kept`): the full model initialised
  from `rng` and cut to the kept channels, each kernel times sqrt(fan_in_full / fan_in_pruned)
  (fan_in: all axes but the last) so that fan-in variance scaling (Flax's default
  lecun_normal) keeps its spread; BatchNorm variables start as they do at any width."""
  full = model.full()
  prog = derive(full, tuple(image_shape))
  variables = full.init(rng, np.zeros((1,) + tuple(image_shape), np.float32))
  first = {g: (np.arange(prog.structure.widths[g]) < len(k)).astype(np.float32)
           for g, k in model.kept_indices().items()}
  _, small, _ = shrink.shrink(prog, variables, first)
  flat = traverse_util.flatten_dict(dict(small))
  before = traverse_util.flatten_dict(dict(variables))
  for key, value in flat.items():
    if key[0] == own.PARAMS and key[-1] == 'kernel' and np.ndim(value) >= 2:
      fan_full = math.prod(np.shape(before[key])[:-1])
      fan_pruned = math.prod(np.shape(value)[:-1])
      if fan_pruned != fan_full:
        flat[key] = np.asarray(value) * np.sqrt(fan_full / fan_pruned).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def pruned_shapes(model: own.OwnModel) -> dict:
  """The shapes and dtypes of a pruned own model's variables, computing nothing."""
  graph = derive(model.full(), tuple(model.image_shape)).graph
  kept = model.kept_indices()
  out = {key: jax.ShapeDtypeStruct(tuple(graph.new_size(layout, kept) for layout in layouts),
                                   aval.dtype)
         for key, layouts, aval in zip(graph.leaf_keys, graph.leaf_layouts, graph.jaxpr.in_avals)}
  return traverse_util.unflatten_dict(out)


def derive_checked(model: own.OwnModel, image_shape) -> Program:
  """`derive` of an own model, where a model that cannot take these images (or that the
  factory cannot build for them) is one sentence naming the shape and the error's first line."""
  try:
    return derive(model, tuple(image_shape))
  except ConfigError:
    raise
  except Exception as error:  # The researcher's code: whatever it raises, say where.
    first = (str(error).strip().splitlines() or [''])[0]
    shape = 'x'.join(map(str, image_shape))
    raise ConfigError(f'model={model.spec} cannot take {shape} images '
                      f'({type(error).__name__}: {first}).', settings=('model',)) from error
