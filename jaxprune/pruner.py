"""Prune your own Flax model: `Pruner(model, variables, example_batch)`.

The model knows nothing of jaxprune. Its channel groups come from the program it runs
(`jaxprune.prune.jaxpr`), and the rest is jaxprune's usual pipeline over them:

    pruner = jaxprune.Pruner(model, variables, images)   # Linen module or apply fn, or NNX
    pruner.groups                                        # {name: Group}, prunable or why not
    scores = pruner.score('taylor', batches)             # any criterion of criteria.CRITERIA
    masks = pruner.select('global', scores, ratio=0.5)   # any policy of select.SELECTIONS
    pruner.apply(variables, images, masks)               # the masked model (= removal)
    small = pruner.shrink(masks)                         # smaller variables and a runnable
    small.apply(small.variables, images)                 # jittable; small.module for NNX

What `model` may be, and what `shrink` gives back:

* A Flax NNX module (no `variables`), traced in eval mode. `shrink(...).module` is the
  user's own module with smaller arrays and its layers' stored feature counts updated
  (`_update_features`): it trains, evaluates and saves like the original. The contract:
  the module's layers read their sizes from their parameters (as nnx's layers do), not
  from integers of its own. RNG state is carried through unchanged, never a channel.
* A Flax Linen module, called as `model.apply(variables, x)` (bind flags such as `train`
  with `functools.partial(model.apply, train=False)`; an unbound required `train` is
  refused), or any function `apply(variables, x) -> logits`. Boxed variables
  (`nn.with_logical_partitioning`) are unboxed. A Linen layer checks its parameters'
  shapes against its constructor fields, so the shrunk model is `shrink(...).apply`, the
  model's traced program run on the smaller arrays (any batch size; jittable; rebuild it
  from the full model and the same `kept` indices). An author whose widths are
  constructor fields can rebuild the module from `shrink(...).widths`.

A model returning several values, `(logits, features)`, is scored on its first (`apply`
and `shrink(...).apply` return them all). Attention is pruned by whole heads, and gates
(squeeze-and-excitation, GLU) are refused like residual streams unless `prune_streams=True`
(`jaxprune.prune.jaxpr` states the rules).

`program` is the model's `jaxprune.prune.program.Program` (read in evaluation mode), which
the criteria run, and `structure` its `Structure`, which selection and cost counting read.
"""

import dataclasses
import inspect
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxprune.errors import ConfigError
from jaxprune.prune import criteria, flops, jaxpr_run, select as select_lib, shrink as shrink_lib
from jaxprune.prune import jaxpr as jaxpr_lib, program as program_lib

_COLLECTIONS = {nnx.Param: 'params', nnx.BatchStat: 'batch_stats'}


def _collection(variable) -> str:
  return next((name for cls, name in _COLLECTIONS.items() if isinstance(variable, cls)),
              type(variable).__name__.lower())


@dataclasses.dataclass(frozen=True, eq=False)
class _Function:
  """The model as `program.from_function` reads it, in the mode the Pruner was given it in."""
  fn: Callable

  def apply(self, variables, x, train: bool = False):
    del train
    return self.fn(variables, x)


@dataclasses.dataclass
class Shrunk:
  """A physically smaller model."""
  variables: Any  # the cut variables (same tree as the Pruner's)
  apply: Callable  # jitted `apply(variables, x)`: the model's program on the cut arrays
  kept: dict[str, np.ndarray]  # {group: indices of the kept channels in the full model}
  widths: dict[str, int]  # {group: number of kept channels} for every prunable group
  cost: flops.Cost  # its MACs and params
  module: Any = None  # for an NNX model, the user's module with the cut arrays


class Pruner:
  """Channel pruning for a model that knows nothing of jaxprune (see the module docstring).

  Args:
    model: an NNX module, a Linen module, or a function `apply(variables, x)`.
    variables: the Linen variables (omit for NNX).
    example_batch: images (B, H, W, C), or a batch dict / (images, labels) pair, at the
      shape the model will be scored at; other batch sizes are traced when they come.
    prune_streams: also prune channels written by several layers (residual streams),
      together with every layer writing them.
    fixed: substrings of leaf paths ('stem', 'params/head') whose channels must be kept; also
      the way around a primitive jaxprune cannot read (its error names the leaf to give).
  """

  def __init__(self, model, variables=None, example_batch=None, *, prune_streams: bool = False,
               fixed: Sequence[str] = ()):
    if example_batch is None:
      raise ValueError("Pruner needs example_batch, the images the model is traced on.")
    self._nnx = isinstance(model, nnx.Module)
    self._rng_keys = ()
    if not callable(model):
      raise ConfigError(f"model={model!r:.80} (a {type(model).__name__}) is not a Flax model; "
                        "pass an nnx.Module, a Linen nn.Module or a function "
                        "apply(variables, x).")
    if self._nnx:
      if variables is not None:
        raise ConfigError("an NNX module carries its own variables; pass Pruner(module, "
                          "None, example_batch) or Pruner(module, example_batch=...).")
      self._module = model
      self._eval_graphdef, variables = self._nnx_variables(model)
      apply = self._nnx_apply
    elif variables is None:
      raise ConfigError("a Linen module or apply function needs its variables: "
                        "Pruner(model, variables, example_batch).")
    else:
      apply = model.apply if isinstance(model, nn.Module) else model
      if isinstance(getattr(apply, '__self__', None), nn.Module) and apply.__name__ == 'apply':
        _check_call_arguments(apply.__self__)
      variables = nn.meta.unbox(variables)
    self.variables = variables
    if isinstance(example_batch, Mapping):
      example_batch = example_batch['image']
    elif isinstance(example_batch, (tuple, list)):
      example_batch = example_batch[0]
    x = jnp.asarray(example_batch)
    self.program = self._traced(lambda: program_lib.from_function(
        _Function(apply), variables, x, prune_streams=prune_streams, fixed=tuple(fixed),
        rng_leaves=self._rng_keys), x)
    self.graph = self.program.graph
    self.groups = self.graph.groups
    self.structure = self.program.structure
    # Plain jax.jit, not compiler.jit: users call these inside their own jitted steps, and
    # compiler options are only allowed on the outermost jit.
    self._masked = jax.jit(lambda variables, x, masks: self.program.apply(
        nn.meta.unbox(variables), x, masks=masks))

  # NNX: variables as a {collection: tree} dict, and back.

  def _nnx_variables(self, module):
    eval_module = nnx.merge(*nnx.split(module))
    eval_module.eval()
    graphdef, state = nnx.split(eval_module)
    self._nnx_flat = list(nnx.to_flat_state(state))
    self._nnx_keys = [(_collection(variable),) + tuple(str(p) for p in path)
                      for path, variable in self._nnx_flat]
    self._rng_keys = tuple(key for key, (_, variable) in zip(self._nnx_keys, self._nnx_flat)
                           if isinstance(variable, nnx.RngState))
    values = [variable.get_value() for _, variable in self._nnx_flat]
    return graphdef, traverse_util.unflatten_dict(dict(zip(self._nnx_keys, values)))

  def _nnx_state(self, variables, flat_state):
    flat = traverse_util.flatten_dict(dict(variables))
    return nnx.from_flat_state([(path, variable.replace(value=flat[key]))
                                for key, (path, variable) in zip(self._nnx_keys, flat_state)])

  def _nnx_apply(self, variables, x):
    return nnx.merge(self._eval_graphdef, self._nnx_state(variables, self._nnx_flat))(x)

  # The program.

  def graph_for(self, x) -> jaxpr_lib.Graph:
    """The derived program for inputs shaped like x (traced once per shape and dtype)."""
    return self._traced(lambda: self.program.graph_for(x), x)

  @staticmethod
  def _traced(trace: Callable, x):
    """trace(), where images the model cannot take are one sentence (ConfigError)."""
    try:
      return trace()
    except ConfigError:
      raise
    except (TypeError, ValueError, flax.errors.ScopeParamShapeError) as error:
      first = str(error).strip().splitlines()[0].rstrip('.')
      raise ConfigError(f"images of shape {tuple(np.shape(x))} do not fit the model: "
                        f"{first}.") from error

  def apply(self, variables, x, masks: Mapping | None = None):
    """The model's output with `masks` ({group: (C,) or (B, C)}) at every consumer; jitted."""
    self.graph_for(x)
    masks = {g: jnp.asarray(m, jnp.float32) for g, m in (masks or {}).items()}
    return self._masked(variables, x, masks)

  # Scores, masks, costs.

  def score(self, criterion: str, batches: Iterable | None = None, masks: Mapping | None = None,
            rng=None, **options) -> dict[str, np.ndarray]:
    """{group: (C,) scores} by a criterion of `criteria.CRITERIA`; higher = keep. `batches`:
    {'image', 'label'} dicts or (images, labels) pairs, read once (data-free criteria ignore
    them)."""
    def checked():
      for index, batch in enumerate(batches if batches is not None else ()):
        images, labels = (batch['image'], batch['label']) if isinstance(batch, Mapping) else batch
        classes = self.graph_for(images).jaxpr.out_avals[0].shape[-1]
        array = np.asarray(labels)
        outside = array[(array < 0) | (array >= classes)]
        if outside.size:
          raise ConfigError(f"batch {index} has label {outside.flat[0]}, outside the model's "
                            f"{classes} classes; labels must be integers in [0, {classes}).")
        yield {'image': images, 'label': labels}

    return criteria.score(criterion, self.program, self.variables, checked(), masks=masks,
                          rng=rng, **options)

  def select(self, policy: str, scores: Mapping, **options) -> dict[str, np.ndarray]:
    """Keep masks by a policy of `select.SELECTIONS` (ratio=, target_macs=, min_channels=, ...)."""
    if not self.structure.prunable:
      kept = ', '.join(f'{g.name} ({g.reason})' for g in self.groups.values())
      raise ConfigError(f"select({policy!r}) needs a prunable channel group, and this model "
                        f"has none: {kept}.")
    for name, allowed in (('ratio', 'the fraction of channels to remove, in [0, 1)'),
                          ('target_macs', 'the fraction of MACs to keep, in (0, 1]')):
      value = options.get(name)
      if value is not None and (np.ndim(value) != 0
                                or not np.issubdtype(np.asarray(value).dtype, np.number)):
        raise ConfigError(f"{name}={value!r} is not a number; it is {allowed}.")
    return select_lib.select(policy, self.structure, scores, **options)

  def cost(self, masks: Mapping | None = None) -> flops.Cost:
    """MACs and params of the model, or of the model with `masks` removed."""
    if not masks:
      return flops.count(self.structure)
    kept = shrink_lib.kept_indices(self.structure, masks)
    return flops.count(self.structure, shrink_lib.widths_after(self.structure, kept))

  # Shrinking.

  def shrink(self, masks: Mapping, variables=None) -> Shrunk:
    """Removes the masked-out channels ({group: (C,)}, nonzero = keep) from `variables`
    (default: the Pruner's own; for NNX, the module's current state)."""
    if variables is None:
      variables = (self._nnx_variables(self._module)[1] if self._nnx else self.variables)
    widths, small, kept = shrink_lib.shrink(self.program, nn.meta.unbox(variables), masks)
    small = jax.tree.map(jnp.asarray, small)

    def run(variables, x):
      leaves = self.program.leaves_of(nn.meta.unbox(variables))
      return jaxpr_run.evaluate(self.graph_for(x), leaves, x, kept=kept)

    return Shrunk(variables=small, apply=jax.jit(run), kept=kept, widths=widths,
                  cost=flops.count(self.structure, widths),
                  module=self._shrunk_module(small) if self._nnx else None)

  def _shrunk_module(self, small):
    graphdef, state = nnx.split(self._module)
    module = nnx.merge(graphdef, self._nnx_state(small, list(nnx.to_flat_state(state))))
    for _, node in nnx.iter_graph(module):
      _update_features(node)
    return module


def _shape(param):
  return tuple(np.shape(param.get_value()))


def _update_features(node):
  """Sets an nnx layer's stored feature counts from its (cut) parameters."""
  if isinstance(node, nnx.Conv):
    kernel = _shape(node.kernel)
    if node.feature_group_count == node.in_features > 1:  # depthwise
      node.feature_group_count = kernel[-1]
    node.in_features = kernel[-2] * node.feature_group_count
    node.out_features = kernel[-1]
    node.kernel_shape = kernel
  elif isinstance(node, nnx.Linear):
    node.in_features, node.out_features = _shape(node.kernel)
  elif isinstance(node, nnx.LinearGeneral):
    # Its bias is reshaped to out_features at every call.
    kernel = _shape(node.kernel)
    start = len(node.batch_axis) + len(node.in_features)
    node.in_features, node.out_features = kernel[len(node.batch_axis):start], kernel[start:]
  elif isinstance(node, nnx.MultiHeadAttention):
    (node.in_features, node.num_heads, node.head_dim), key = map(
        _shape, (node.query.kernel, node.key.kernel))
    node.in_kv_features, node.num_kv_heads = key[0], key[1]
    node.qkv_features = node.num_heads * node.head_dim
    node.out_features = _shape(node.out.kernel)[-1]
  elif isinstance(node, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)):
    params = [getattr(node, n, None) for n in ('scale', 'bias', 'mean', 'var')]
    shape = next((_shape(p) for p in params if isinstance(p, nnx.Variable)), None)
    if shape is not None:
      node.num_features = shape[-1]


def _check_call_arguments(module: nn.Module):
  """A Linen module is called as `model.apply(variables, x)`: every other argument it requires
  (`train`) must be bound first."""
  params = list(inspect.signature(module.__call__).parameters.values())[1:]
  missing = [p.name for p in params if p.default is p.empty
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
  if missing:
    bound = ', '.join(f'{n}=False' if n == 'train' else f'{n}=...' for n in missing)
    raise ConfigError(f"the Linen module {type(module).__name__} requires {missing} besides the "
                      f"images, and Pruner calls model.apply(variables, images); pass "
                      f"functools.partial(model.apply, {bound}).")
