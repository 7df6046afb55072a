"""Train and eval steps: the state, the pure steps, and `Trainer` / `Evaluator`, which jit them.

`Trainer` and `Evaluator` jit the pure `train_step` and `eval_step` over a `Mesh` of all
devices (batch split along 'data', state replicated): the same code runs on one CPU, eight TPU
cores or a multi-host pod, every process running one program on global arrays. Masks, weight
masks and the learning rate are jit inputs, so changing their values (iterative pruning,
another schedule or length) never recompiles; `train_calls` runs many steps per call.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxprune import data, stream
from jaxprune.errors import ConfigError, choose
from jaxprune.kernels import compiler
from jaxprune.prune import structure as structure_lib
from jaxprune.train.optim import OptimizerConfig, make_optimizer

DATA_AXIS = 'data'
# How many Trainers, Evaluators and other compiled programs of each kind a process keeps (the
# least recently used go, with their executables): a run uses a few, an experiment many.
PROGRAMS_KEPT = 8

Masks = Mapping[str, jax.Array] | None
# The state's variable collection of 0/1 arrays at the paths of the params they mask.
WEIGHT_MASKS = 'weight_masks'


@struct.dataclass
class TrainState:
  """Everything that determines the rest of a training run.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the trained variables.
    batch_stats: BN running statistics ({} for models without BN).
    constants: the other variable collections (e.g. `indices`), never trained.
    opt_state: the optimizer's state (momentum buffers).
    rng: uint32[2] PRNG key made from the seed; every random choice of the run (the
      epoch's permutation, a step's augmentation) is folded from it and the epoch or
      step number, so a resumed run draws exactly what the uninterrupted one did.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  constants: Any
  opt_state: Any
  rng: jax.Array

  @property
  def variables(self) -> dict:
    """The model variables, as `model.apply` takes them."""
    out = {'params': self.params, **self.constants}
    if self.batch_stats:
      out['batch_stats'] = self.batch_stats
    return out


def create_state(variables: Mapping, tx: optax.GradientTransformation, seed: int) -> TrainState:
  rest = dict(variables)
  params = rest.pop('params')
  batch_stats = rest.pop('batch_stats', {})
  # Jitted: called eagerly, tx.init compiles a program per distinct leaf shape.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    constants=rest, opt_state=jax.jit(tx.init)(params),
                    # A raw uint32 key: checkpoints store (and checksum) plain arrays.
                    rng=jax.random.PRNGKey(seed))


def keep_multipliers(structure: structure_lib.Structure, masks: Mapping, tree, collection: str):
  """0/1 multipliers shaped for each leaf of `tree` (one variable collection): 0 where any of
  its axes indexes a channel a (C,) mask removes (a conv's kernel is frozen for its own removed
  filters and for the removed inputs it reads); the Python scalar 1.0 where no mask touches."""
  def multiplier(path, leaf):
    keep = 1.0
    tags = structure.axes[(collection,) + tuple(k.key for k in path)]
    for axis, group in enumerate(tags):
      if group in masks:
        mask = masks[group]
        if mask.ndim != 1:
          raise ValueError(f"training masks must have shape (C,); group {group!r} has "
                           f"shape {tuple(mask.shape)}.")
        shape = [1] * leaf.ndim
        shape[axis] = -1
        keep = keep * (mask != 0).astype(leaf.dtype).reshape(shape)
    return keep

  return jax.tree_util.tree_map_with_path(multiplier, tree)


def masked_kernels(structure: structure_lib.Structure, masks: Masks, params):
  """The masked model: `params` with every kernel (a leaf whose MACs the structure counts)
  multiplied by `masks` along the axes their groups index, so zero where it reads or writes
  a removed channel. The model's own program (with its fast kernels) runs unchanged."""
  if not masks:
    return params
  keep = keep_multipliers(structure, masks, params, 'params')
  return jax.tree_util.tree_map_with_path(
      lambda path, p, k: p * k if ('params',) + tuple(x.key for x in path) in structure.positions
      else p, params, keep)


def weight_keep(params, weight_masks: Mapping):
  """Multipliers for each leaf of `params`: its weight mask, or the Python scalar 1.0."""
  flat = traverse_util.flatten_dict(dict(weight_masks))
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: flat[key].astype(leaf.dtype)
      if (key := tuple(k.key for k in path)) in flat else 1.0, params)


def _freeze(new, old, keep):
  return new if isinstance(keep, float) else jnp.where(keep != 0, new, old)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# The dtypes the forward and backward passes may compute in (`train_step`).
PRECISIONS: dict[str, Any] = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(precision: str):
  """The dtype of `precision` (ConfigError for an unknown one)."""
  choose('precision', precision, PRECISIONS, setting='precision')
  return PRECISIONS[precision]


def _cast_floats(tree, dtype):
  # Integer leaves (`indices`) are structure, not values to compute with.
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def train_step(state: TrainState, batch: Mapping, masks: Masks, learning_rate: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation,
               structure: structure_lib.Structure | None = None,
               precision: str = 'float32') -> tuple[TrainState, dict]:
  """One SGD step (pure). Returns the new state and {'loss', 'accuracy'} of the batch.

  The parameters move by -learning_rate x `tx`'s update (`make_optimizer`: the momentum
  buffer), so any schedule runs on the same compiled step. BN runs in training mode. With
  masks (which need `structure`) the model is the masked one (`masked_kernels`); weight
  decay, the BN L1 term and momentum would still move a removed channel's weights, so the
  updates, momentum buffers and BN statistics of everything it indexes (`keep_multipliers`)
  are held. Weights the state's `WEIGHT_MASKS` mask get no update and no momentum either.

  `precision` (one of PRECISIONS) is the dtype of the forward and backward passes: params
  and image are cast to it inside the loss and the logits back to float32, so the gradient,
  params, optimizer state and BN statistics stay float32.
  """
  dtype = compute_dtype(precision)
  if masks and structure is None:
    raise ValueError('train_step with masks needs the model structure.')

  def loss_fn(params):
    params = masked_kernels(structure, masks, params)
    variables = {**state.variables, 'params': _cast_floats(params, dtype)}
    logits, updated = model.apply(variables, batch['image'].astype(dtype), train=True,
                                  mutable=['batch_stats'])
    logits = logits.astype(jnp.float32)
    loss = jnp.mean(cross_entropy(logits, batch['label']))
    return loss, (logits, updated.get('batch_stats', {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # Statistics keep their dtype whatever the compute dtype, so the next step's input matches.
  batch_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), batch_stats, state.batch_stats)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if masks:
    keep = keep_multipliers(structure, masks, state.params, 'params')
    updates = jax.tree.map(lambda u, k: u * k, updates, keep)
    opt_state = optax.tree_utils.tree_map_params(tx, lambda s, k: s * k, opt_state, keep)
    keep_stats = keep_multipliers(structure, masks, state.batch_stats, 'batch_stats')
    batch_stats = jax.tree.map(_freeze, batch_stats, state.batch_stats, keep_stats)
  if WEIGHT_MASKS in state.constants:
    keep = weight_keep(state.params, state.constants[WEIGHT_MASKS])
    updates = jax.tree.map(lambda u, k: u * k, updates, keep)
    opt_state = optax.tree_utils.tree_map_params(tx, lambda s, k: s * k, opt_state, keep)
  step_size = -jnp.asarray(learning_rate, jnp.float32)
  updates = jax.tree.map(lambda u: step_size * u, updates)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  return new_state, {'loss': loss, 'accuracy': accuracy}


def eval_step(variables: Mapping, batch: Mapping, masks: Masks, *, model: nn.Module,
              precision: str = 'float32', structure: structure_lib.Structure | None = None) -> dict:
  """Sums over the valid examples of a batch: {'loss_sum', 'correct', 'count'} (pure).

  Takes the model variables (`TrainState.variables`, or a `fit` result), so a training state
  and saved variables run the same program; `precision` and masks as in `train_step`."""
  dtype = compute_dtype(precision)
  if masks and structure is None:
    raise ValueError('eval_step with masks needs the model structure.')
  params = masked_kernels(structure, masks, variables['params'])
  variables = {**variables, 'params': _cast_floats(params, dtype)}
  logits = model.apply(variables, batch['image'].astype(dtype), train=False)
  logits = logits.astype(jnp.float32)
  valid = batch.get('valid')
  valid = jnp.ones(logits.shape[:1], jnp.float32) if valid is None else valid.astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {'loss_sum': jnp.sum(cross_entropy(logits, batch['label']) * valid),
          'correct': jnp.sum(correct * valid), 'count': jnp.sum(valid)}


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all devices (of all processes), axis 'data'."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def epoch_keys(rng, epoch):
  """(permutation key, augmentation key) of one epoch; a step's key folds in its index."""
  return tuple(jax.random.split(jax.random.fold_in(rng, epoch)))


class Evaluator:
  """The jitted, sharded evaluation of one model and precision on one mesh.

  `eval_step(variables, batch, masks)` returns the batch's sums on device and `add`
  accumulates them, so an evaluation waits for the device once, at the end. With
  `copies=True` the variables have a leading copy axis; every copy reads the same batch.
  It holds no optimizer, so every Trainer of the model shares one.
  """

  def __init__(self, model: nn.Module, mesh: Mesh, precision: str = 'float32',
               copies: bool = False, structure: structure_lib.Structure | None = None):
    compute_dtype(precision)
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    evaluation = functools.partial(eval_step, model=model, precision=precision, structure=structure)
    if copies:
      evaluation = jax.vmap(evaluation, in_axes=(0, None, None))

    def sharded_eval_step(variables, batch, masks):
      batch = jax.lax.with_sharding_constraint(batch, self.batch_sharding)
      return evaluation(variables, batch, masks)

    self.eval_step = compiler.jit(sharded_eval_step, xla_options=model.performance.xla_options,
                                  out_shardings=self.replicated)
    self.add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)


class Trainer:
  """The jitted, sharded steps of one model, optimizer and precision on one mesh.

  `train_step(state, batch, masks, learning_rate)` donates the state and returns device
  arrays: nothing waits for the device. Pass the learning rate as a numpy float32 scalar
  (`learning_rates`), so that every value runs the same compiled step. BN statistics and
  gradients are reduced over the whole global batch, so the result does not depend on the
  number of devices. With `copies=True` the state and the training batch have a leading copy
  axis (K independent runs, `fit_copies`) and one vmapped program trains them all; masks are
  not vmapped. `eval_step` is `evaluator`'s (default: one of its own); `sharded_train_step`
  is the step unjitted, for a program that loops over many steps in one call.
  """

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation,
               structure: structure_lib.Structure | None = None, mesh: Mesh | None = None,
               precision: str = 'float32', copies: bool = False,
               evaluator: Evaluator | None = None):
    compute_dtype(precision)
    self.tx, self.copies = tx, copies
    mesh = mesh if mesh is not None else make_mesh()
    self.evaluator = evaluator or Evaluator(model, mesh, precision, copies, structure)
    self.eval_step = self.evaluator.eval_step
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(
        mesh, PartitionSpec(None, DATA_AXIS) if copies else PartitionSpec(DATA_AXIS))
    step = functools.partial(train_step, model=model, tx=tx, structure=structure,
                             precision=precision)
    if copies:
      step = jax.vmap(step, in_axes=(0, 0, None, None))

    def sharded_train_step(state, batch, masks, learning_rate):
      batch = jax.lax.with_sharding_constraint(batch, self.batch_sharding)
      return step(state, batch, masks, learning_rate)

    self.sharded_train_step = sharded_train_step
    self.xla_options = model.performance.xla_options
    self.train_step = compiler.jit(sharded_train_step, xla_options=self.xla_options,
                                   donate_argnums=0, out_shardings=self.replicated)
    # Copy i of a stacked tree, replicated; one program for every i (jitted, so it also
    # works on arrays spread over several processes).
    self.copy_at = jax.jit(lambda tree, i: jax.tree.map(lambda x: x[i], tree),
                           out_shardings=self.replicated)

  def init_state(self, variables, seed) -> TrainState:
    """The initial state, replicated on the mesh; with copies, `variables` and `seed` are
    sequences (one per copy) and the state is their stack along a new leading axis."""
    if not self.copies:
      return self.replicate(create_state(variables, self.tx, seed))
    states = [jax.device_get(create_state(v, self.tx, s)) for v, s in zip(variables, seed)]
    return self.replicate(jax.tree.map(lambda *leaves: np.stack(leaves), *states))

  def variables_of(self, state: TrainState, copy: int = 0) -> dict:
    """The model variables of copy `copy` of the state (the state's own without copies)."""
    return self.copy_at(state.variables, copy) if self.copies else state.variables

  def replicate(self, tree):
    # Through host memory, so that every process contributes the same global value.
    return jax.device_put(jax.device_get(tree), self.replicated)

  def shard_batch(self, batch: Mapping) -> dict:
    """Places a single-process host batch on the mesh, split along 'data'."""
    return jax.device_put(dict(batch), self.batch_sharding)


@dataclasses.dataclass(frozen=True)
class _ByKey:
  """`value` hashed and compared by `key`, to pass an unhashable value to an lru_cache."""
  key: Any
  value: Any = dataclasses.field(compare=False)


def _structure(structure: structure_lib.Structure | None) -> _ByKey:
  return _ByKey(None if structure is None else (tuple(structure.widths.items()),
                                                structure.prunable), structure)


@functools.lru_cache(maxsize=PROGRAMS_KEPT)
def _evaluator(model, mesh, precision, copies, structure: _ByKey) -> Evaluator:
  """The Evaluator shared by every evaluation of one program (in `fit`, of saved variables)."""
  return Evaluator(model, mesh, precision, copies, structure.value)


def trainer_for(model: nn.Module, optimizer: OptimizerConfig,
                structure: structure_lib.Structure | None, mesh: Mesh,
                precision: str = 'float32', copies: bool = False) -> Trainer:
  """A Trainer shared by every fit that compiles to the same program: keyed by only what the
  compiled step depends on, the model (its class, widths and performance options), the
  optimizer settings `make_optimizer` builds in (not the learning rate, its schedule or the
  run's length, which are step inputs), the structure, the mesh and the precision; so seeds
  and regimes that train the same widths compile each step once."""
  built_in = OptimizerConfig(momentum=optimizer.momentum, nesterov=optimizer.nesterov,
                             weight_decay=optimizer.weight_decay, bn_l1=optimizer.bn_l1)
  return _trainer(model, built_in, _structure(structure), mesh, precision, copies)


@functools.lru_cache(maxsize=PROGRAMS_KEPT)
def _trainer(model, optimizer, structure: _ByKey, mesh, precision, copies) -> Trainer:
  return Trainer(model, make_optimizer(optimizer), structure.value, mesh, precision, copies,
                 _evaluator(model, mesh, precision, copies, structure))


TRAIN_SET = ('train_images', 'train_labels')
TEST_SET = ('test_images', 'test_labels')


def check_divisible(name: str, size: int, mesh: Mesh) -> None:
  if size % mesh.size:
    raise ConfigError(f"{name} {size} is not divisible by the {mesh.size} devices.",
                      settings=(name,))


_PLACED: dict = {}


def on_mesh(arrays: Mapping, names: Sequence[str], sharding: NamedSharding) -> dict:
  """{name: arrays[name]} for `names`, replicated with `sharding`: as they are when placed
  so, else copied once per source and kept for the last two datasets (so evaluating one
  host test set again and again copies it once)."""
  sources = tuple(arrays[name] for name in names)
  if all(getattr(x, 'sharding', None) == sharding for x in sources):
    return dict(zip(names, sources))
  key = (tuple(map(id, sources)), sharding)
  if key not in _PLACED:
    if len(_PLACED) >= 2:
      _PLACED.pop(next(iter(_PLACED)))
    # The sources stay referenced by their entry, so no other array can take their ids.
    _PLACED[key] = (sources, jax.device_put(dict(zip(names, sources)), sharding))
  return _PLACED[key][1]


def _batch_maker(spec: data.DataSpec, copies: bool) -> Callable:
  """`make_batch(images, labels, order, rng, step)`: step `step`'s augmented batch (pure);
  with copies vmapped over the orders and keys, each copy's own batch."""
  def make_batch(images, labels, order, rng, step):
    epoch, index = step // order.shape[0], step % order.shape[0]
    key = jax.random.fold_in(epoch_keys(rng, epoch)[1], index)
    return data.train_batch(images, labels, order[index], key, spec)

  return jax.vmap(make_batch, in_axes=(None, None, 0, 0, None)) if copies else make_batch


@functools.lru_cache(maxsize=PROGRAMS_KEPT)
def _epoch_fns(n: int, batch_size: int, spec: data.DataSpec, copies: bool,
               replicated: NamedSharding, batch_sharding: NamedSharding):
  def permutation(rng, epoch):
    return data.epoch_permutation(epoch_keys(rng, epoch)[0], n, batch_size)

  if copies:
    permutation = jax.vmap(permutation, in_axes=(0, None))
  return (jax.jit(permutation, out_shardings=replicated),
          jax.jit(_batch_maker(spec, copies), out_shardings=batch_sharding))


def epoch_programs(trainer: Trainer, train_set: Mapping, spec: data.DataSpec, batch_size: int):
  """Jitted (permutation(rng, epoch), make_batch(order, rng, step)) of the device-resident
  training set; with a copies trainer each copy draws what its own run would. Shared by every
  fit of the same set size, batch, spec and shardings (the seeds and regimes of a run)."""
  images, labels = train_set['train_images'], train_set['train_labels']
  permutation, make_batch = _epoch_fns(int(labels.shape[0]), batch_size, spec, trainer.copies,
                                       trainer.replicated, trainer.batch_sharding)
  return permutation, functools.partial(make_batch, images, labels)


def _add_metrics(sums, bad, metrics, step, limit):
  """Adds a step's loss and accuracy to the sums; notes `step` and its loss in `bad` if it is
  the first whose loss is not finite or above `limit` (bad['step'] 0: none yet)."""
  first = (bad['step'] == 0) & ~(metrics['loss'] <= limit)
  bad = {'step': jnp.where(first, step, bad['step']),
         'loss': jnp.where(first, metrics['loss'], bad['loss'])}
  return {name: sums[name] + metrics[name] for name in sums}, bad


accumulate_metrics = jax.jit(_add_metrics, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=PROGRAMS_KEPT)
def train_calls(trainer: Trainer, spec: data.DataSpec) -> Callable:
  """The jitted program of many steps, `sharded_train_steps(state, sums, bad, masks, images,
  labels, order, rates, limit, start, stop)` -> (state, sums, bad): steps start..stop-1 of the
  epoch whose permutation is `order`, each one make_batch, train_step and `_add_metrics`.
  `rates` are the epoch's learning rates; start and stop are inputs, so every call length
  (and fits of other lengths) run the same compiled program. state, sums and bad are donated."""
  make_batch = _batch_maker(spec, trainer.copies)

  def sharded_train_steps(state, sums, bad, masks, images, labels, order, rates, limit, start,
                          stop):
    def one_step(step, carry):
      state, sums, bad = carry
      batch = make_batch(images, labels, order, state.rng, step)
      state, metrics = trainer.sharded_train_step(state, batch, masks, rates[step % rates.shape[0]])
      return (state, *_add_metrics(sums, bad, metrics, state.step, limit))

    return jax.lax.fori_loop(start, stop, one_step, (state, sums, bad))

  return compiler.jit(sharded_train_steps, xla_options=trainer.xla_options,
                      donate_argnums=(0, 1, 2), out_shardings=trainer.replicated)


@functools.partial(jax.jit, static_argnums=1)
def all_finite(tree, copies: bool):
  """Per copy ((K,), or (1,) without copies): whether every leaf of `tree` is finite."""
  return jnp.stack([jnp.isfinite(x).reshape(x.shape[0] if copies else 1, -1).all(1)
                    for x in jax.tree.leaves(tree)]).all(0)


def evaluate(evaluator: Evaluator, variables, test_set: Mapping, spec: data.DataSpec,
             masks: Masks, batch_size: int) -> dict:
  """Test-set {'loss', 'accuracy'}: float arrays, shape (K,) with copies, else (). The
  batches' sums stay on device; the one host sync is at the end. `test_set` is the
  device-resident test arrays or a `stream.Stream`."""
  sums = None
  if isinstance(test_set, stream.Stream):
    batches = (stream.to_device(host, evaluator.batch_sharding, spec)
               for host in stream.test_batches(test_set, batch_size))
  else:
    batches = data.eval_batches(test_set['test_images'], test_set['test_labels'], batch_size, spec)
  for batch in batches:
    out = evaluator.eval_step(variables, batch, masks)
    sums = out if sums is None else evaluator.add(sums, out)
  sums = jax.device_get(sums)
  return {'loss': np.asarray(sums['loss_sum'] / sums['count'], float),
          'accuracy': np.asarray(sums['correct'] / sums['count'], float)}


def evaluate_variables(model: nn.Module, variables: Mapping, arrays: Mapping,
                       spec: data.DataSpec, *, batch_size: int, precision: str = 'float32',
                       mesh: Mesh | None = None) -> dict:
  """Test-set {'loss': float, 'accuracy': float} of `model` with `variables` (eval mode).

  The same compiled step as `fit`'s per-epoch evaluation of that model, precision and mesh.
  `arrays` holds 'test_images' and 'test_labels' (device-resident, or host arrays copied to
  the mesh once per dataset), or is a `stream.Stream`; `batch_size` is global, divisible by
  the devices, the last batch padded."""
  mesh = mesh if mesh is not None else make_mesh()
  check_divisible('batch_size', batch_size, mesh)
  evaluator = _evaluator(model, mesh, precision, False, _structure(None))
  test_set = (arrays if isinstance(arrays, stream.Stream) else
              on_mesh(arrays, TEST_SET, evaluator.replicated))
  variables = jax.device_put(dict(variables), evaluator.replicated)
  test = evaluate(evaluator, variables, test_set, spec, None, batch_size)
  return {name: float(value) for name, value in test.items()}
