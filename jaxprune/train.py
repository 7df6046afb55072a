"""Training: state, optimizer, jitted data-parallel steps, and `fit`: the loop every regime uses.

* `TrainState` is a pytree: everything a checkpoint needs to continue bit-for-bit.
* `make_optimizer(config)`: SGD's direction (coupled weight decay, network slimming's L1
  penalty on BN scales, momentum); `learning_rates(config, epochs, steps_per_epoch)`: the
  schedule's value at every step, which `train_step` takes as an input.
* `train_step(state, batch, masks, learning_rate)` / `eval_step` are pure; `Trainer` jits
  them over a `jax.sharding.Mesh` of all devices (batch split along 'data', state
  replicated), so the same code runs on one CPU, eight TPU cores or a multi-host pod.
* Masks and the learning rate are jit inputs: changing their values (iterative pruning,
  another schedule or length) never recompiles, and the parameters of masked-out channels
  are held fixed (no gradient, decay, L1 or momentum moves them).
* `precision` (one of PRECISIONS) is the dtype the forward and backward passes compute in;
  parameters, their updates, optimizer state and BN statistics are always float32.
* `fit` shuffles and augments on device, checkpoints every epoch (resuming after a crash or
  preemption) and leaves metrics.jsonl and result.json in the stage directory.
* `fit_copies` trains K runs of equal widths (e.g. K seeds) as one vmapped program
  through the same loop, leaving each run's stage directory as its own `fit` would.
"""

import dataclasses
import functools
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxprune import checkpoint, compiler, data
from jaxprune import structure as structure_lib
from jaxprune.errors import ConfigError, choose
from jaxprune.models import widths_of

DATA_AXIS = 'data'

Masks = Mapping[str, jax.Array] | None


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
                    rng=jax.random.PRNGKey(seed))


# ----------------------------------------------------------------------------- optimizer


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """SGD settings; the defaults are [R]'s CIFAR baseline (lr 0.1 x0.1 at 50% and 75%, wd 1e-4).

  Attributes:
    learning_rate: initial (peak) learning rate.
    schedule: one of SCHEDULES: 'step' (x decay_factor at each milestone), 'cosine'
      (to zero at the end of training), 'constant'.
    decay_fractions: 'step' milestones as fractions of the epochs; milestone epoch =
      int(fraction * epochs) (so 170 epochs decay at 85 and 127).
    decay_epochs: explicit 'step' milestones in epochs; when given, replaces decay_fractions.
    decay_factor: the 'step' multiplier at each milestone.
    momentum: heavy-ball momentum (PyTorch convention: buf = momentum * buf + grad).
    nesterov: Nesterov momentum.
    weight_decay: coupled L2 decay: weight_decay * param is added to every gradient.
    bn_l1: network slimming's sparsity s: s * sign(gamma) is added to every BN scale's gradient.
  """
  learning_rate: float = 0.1
  schedule: str = 'step'
  decay_fractions: tuple[float, ...] = (0.5, 0.75)
  decay_epochs: tuple[int, ...] | None = None
  decay_factor: float = 0.1
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 1e-4
  bn_l1: float = 0.0


def _step_schedule(cfg: OptimizerConfig, epochs: int, steps_per_epoch: int) -> optax.Schedule:
  if cfg.decay_epochs is not None:
    milestones = list(cfg.decay_epochs)
    bad = [m for m in milestones if int(m) != m or not 0 <= m <= epochs]
    if bad:
      raise ConfigError(f"decay epochs {bad} are not whole epochs in [0, {epochs}].")
  else:
    bad = [f for f in cfg.decay_fractions if not 0 < f < 1]
    if bad:
      raise ConfigError(f"decay fractions {bad} are not between 0 and 1 (exclusive).")
    milestones = [int(f * epochs) for f in cfg.decay_fractions]
  scales = {}
  for epoch in milestones:
    # Two milestones on the same epoch (very short runs) both apply.
    boundary = int(epoch) * steps_per_epoch
    scales[boundary] = scales.get(boundary, 1.0) * cfg.decay_factor
  return optax.piecewise_constant_schedule(cfg.learning_rate, scales)


SCHEDULES: dict[str, Callable[[OptimizerConfig, int, int], optax.Schedule]] = {
    'step': _step_schedule,
    'cosine': lambda cfg, epochs, spe: optax.cosine_decay_schedule(cfg.learning_rate, epochs * spe),
    'constant': lambda cfg, epochs, spe: optax.constant_schedule(cfg.learning_rate),
}


def learning_rate_schedule(cfg: OptimizerConfig, epochs: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """The learning rate as a function of the optimizer step."""
  choose('learning-rate schedule', cfg.schedule, SCHEDULES)
  return SCHEDULES[cfg.schedule](cfg, epochs, steps_per_epoch)


def learning_rates(cfg: OptimizerConfig, epochs: int, steps_per_epoch: int) -> np.ndarray:
  """The learning rate of every step of a run: float32, shape (epochs * steps_per_epoch,).

  One vectorised evaluation of the schedule before training; `fit` passes entry `step`
  to `train_step`, so the schedule is never part of a compiled program.
  """
  steps = np.arange(epochs * steps_per_epoch, dtype=np.int32)
  rates = learning_rate_schedule(cfg, epochs, steps_per_epoch)(steps)
  # A constant schedule returns a scalar whatever the steps.
  return np.broadcast_to(np.asarray(rates, np.float32), steps.shape)


def is_bn_scale(params) -> Any:
  """True for every BatchNorm scale (gamma) leaf.

  Flax names a BatchNorm's gamma 'scale'; every normalisation layer in jaxprune's
  models is a BatchNorm, so the leaf name identifies them.
  """
  return traverse_util.path_aware_map(lambda path, _: path[-1] == 'scale', params)


def add_bn_scale_l1(strength: float) -> optax.GradientTransformation:
  """Network slimming's sparsity: adds strength * sign(gamma) to each BN scale's gradient."""

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('add_bn_scale_l1 needs the params passed to update().')
    return jax.tree.map(lambda g, p: g + strength * jnp.sign(p), updates, params), state

  return optax.masked(optax.GradientTransformation(lambda params: optax.EmptyState(), update),
                      is_bn_scale)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """SGD's direction as in the papers: grad + wd * param (+ s * sign(gamma)) -> momentum.

  The result is the momentum buffer (PyTorch convention: buf = momentum * buf + grad; with
  Nesterov, grad + momentum * buf); `train_step` multiplies it by -learning_rate, the
  step's input, which is optax.sgd with the schedule evaluated outside the program.
  """
  parts = []
  if cfg.weight_decay:
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  if cfg.bn_l1:
    parts.append(add_bn_scale_l1(cfg.bn_l1))
  if cfg.momentum:
    parts.append(optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov))
  return optax.chain(*parts)


# ----------------------------------------------------------------------------- steps


def keep_multipliers(structure: structure_lib.Structure, masks: Mapping, tree, collection: str):
  """0/1 multipliers shaped for each leaf of `tree` (one variable collection).

  A leaf entry is 0 where any of its axes indexes a channel that a (C,) mask removes,
  so a conv's kernel is frozen both for its own removed filters and for the removed
  input channels it reads. Leaves no mask touches get the Python scalar 1.0.
  """
  def multiplier(path, leaf):
    keep = 1.0
    tags = structure.axes[(collection,) + tuple(k.key for k in path)]
    for axis, group in enumerate(tags):
      if group in masks:
        mask = masks[group]
        if mask.ndim != 1:
          raise ConfigError(f"training masks must have shape (C,); group {group!r} has "
                            f"shape {tuple(mask.shape)}.")
        shape = [1] * leaf.ndim
        shape[axis] = -1
        keep = keep * (mask != 0).astype(leaf.dtype).reshape(shape)
    return keep

  return jax.tree_util.tree_map_with_path(multiplier, tree)


def _freeze(new, old, keep):
  return new if isinstance(keep, float) else jnp.where(keep != 0, new, old)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# The dtypes the forward and backward passes may compute in. bfloat16 halves the memory
# traffic of activations on GPUs and TPUs; parameters and what updates them stay float32.
PRECISIONS: dict[str, Any] = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(precision: str):
  """The dtype of `precision` (ConfigError for an unknown one)."""
  choose('precision', precision, PRECISIONS)
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
  buffer); the learning rate is a float32 scalar input, so any schedule runs on the same
  compiled step. BN runs in training mode (batch statistics, running averages updated).
  With masks, a removed channel's activation is zero, so its producing weights get no
  gradient; weight decay, the BN L1 term and momentum would still move them, so the
  updates, the momentum buffers and the BN statistics of everything a removed channel
  indexes (`keep_multipliers`, from `structure`) are held at their current values.

  With precision 'bfloat16' the parameters and the image are cast to bfloat16 inside the
  loss (BN still normalises and keeps its statistics in float32) and the logits back to
  float32 for the loss; the gradient arrives in float32 through the cast, so the
  optimizer and the parameters never see bfloat16.
  """
  dtype = compute_dtype(precision)

  def loss_fn(params):
    variables = {**state.variables, 'params': _cast_floats(params, dtype)}
    logits, updated = model.apply(variables, batch['image'].astype(dtype), train=True,
                                  masks=masks, mutable=['batch_stats'])
    logits = logits.astype(jnp.float32)
    loss = jnp.mean(cross_entropy(logits, batch['label']))
    return loss, (logits, updated.get('batch_stats', {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # Statistics keep their dtype whatever the compute dtype, so the next step's input matches.
  batch_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), batch_stats,
                             state.batch_stats)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if masks:
    if structure is None:
      raise ValueError('train_step with masks needs the model structure.')
    keep = keep_multipliers(structure, masks, state.params, 'params')
    updates = jax.tree.map(lambda u, k: u * k, updates, keep)
    opt_state = optax.tree_utils.tree_map_params(tx, lambda s, k: s * k, opt_state, keep)
    keep_stats = keep_multipliers(structure, masks, state.batch_stats, 'batch_stats')
    batch_stats = jax.tree.map(_freeze, batch_stats, state.batch_stats, keep_stats)
  step_size = -jnp.asarray(learning_rate, jnp.float32)
  updates = jax.tree.map(lambda u: step_size * u, updates)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  return new_state, {'loss': loss, 'accuracy': accuracy}


def eval_step(state: TrainState, batch: Mapping, masks: Masks, *, model: nn.Module,
              precision: str = 'float32') -> dict:
  """Sums over the valid examples of a batch: {'loss_sum', 'correct', 'count'} (pure).

  Computes in `precision` like `train_step` (BN statistics stay float32), the loss in float32.
  """
  dtype = compute_dtype(precision)
  variables = {**state.variables, 'params': _cast_floats(state.params, dtype)}
  logits = model.apply(variables, batch['image'].astype(dtype), train=False, masks=masks)
  logits = logits.astype(jnp.float32)
  valid = batch.get('valid')
  valid = jnp.ones(logits.shape[:1], jnp.float32) if valid is None else valid.astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {'loss_sum': jnp.sum(cross_entropy(logits, batch['label']) * valid),
          'correct': jnp.sum(correct * valid), 'count': jnp.sum(valid)}


# ----------------------------------------------------------------------------- devices


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all devices (of all processes), axis 'data'."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def initialize_multihost(**kwargs) -> None:
  """Joins the processes of a multi-host run (`jax.distributed.initialize(**kwargs)`).

  Call once per process before any other JAX call; on Cloud TPU and SLURM the
  coordinator is found automatically. Every process then runs the same program
  (`fit` included) on global arrays; `host_batch_slice` and `global_batch` let each
  process feed its part of a host-made batch.
  """
  jax.distributed.initialize(**kwargs)
  logging.info('process %d of %d: %d local of %d devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def host_batch_slice(global_batch_size: int) -> slice:
  """The rows of a global batch this process feeds (contiguous, in process order)."""
  per_process, rest = divmod(global_batch_size, jax.process_count())
  if rest:
    raise ConfigError(f"batch size {global_batch_size} is not divisible by the "
                      f"{jax.process_count()} processes.")
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def global_batch(local_batch: Mapping, mesh: Mesh) -> dict:
  """Assembles each process's rows (`host_batch_slice`) into one batch sharded along 'data'."""
  sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def epoch_keys(rng, epoch):
  """(permutation key, augmentation key) of one epoch; a step's key folds in its index."""
  perm_key, augment_key = jax.random.split(jax.random.fold_in(rng, epoch))
  return perm_key, augment_key


class Trainer:
  """The jitted, sharded steps of one model, optimizer and precision on one mesh.

  `train_step(state, batch, masks, learning_rate)` donates the state (its buffers are
  reused for the new one) and returns device arrays: nothing waits for the device. Pass
  the learning rate as a numpy float32 scalar (`learning_rates`), so that every value
  runs the same compiled step. The batch is split along the mesh's 'data' axis and
  everything else is replicated; BN statistics and gradients are reduced over the whole
  global batch, so the result does not depend on the number of devices.

  With `copies=True` the steps are vmapped over a leading copy axis of the state and of
  the training batch (K independent runs, `fit_copies`): one program trains them all,
  and every copy reads the same test batches in `eval_step`. Masks are not vmapped.
  """

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation,
               structure: structure_lib.Structure | None = None, mesh: Mesh | None = None,
               precision: str = 'float32', copies: bool = False):
    compute_dtype(precision)
    self.tx = tx
    self.copies = copies
    self.mesh = mesh if mesh is not None else make_mesh()
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.eval_batch_sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
    self.batch_sharding = (NamedSharding(self.mesh, PartitionSpec(None, DATA_AXIS)) if copies
                           else self.eval_batch_sharding)
    step = functools.partial(train_step, model=model, tx=tx, structure=structure,
                             precision=precision)
    evaluation = functools.partial(eval_step, model=model, precision=precision)
    if copies:
      step = jax.vmap(step, in_axes=(0, 0, None, None))
      evaluation = jax.vmap(evaluation, in_axes=(0, None, None))

    def sharded_train_step(state, batch, masks, learning_rate):
      batch = jax.lax.with_sharding_constraint(batch, self.batch_sharding)
      return step(state, batch, masks, learning_rate)

    def sharded_eval_step(state, batch, masks):
      batch = jax.lax.with_sharding_constraint(batch, self.eval_batch_sharding)
      return evaluation(state, batch, masks)

    self.train_step = compiler.jit(sharded_train_step, donate_argnums=0,
                                   out_shardings=(self.replicated, self.replicated))
    self.eval_step = compiler.jit(sharded_eval_step, out_shardings=self.replicated)
    self.add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
    # Copy i of a stacked tree, replicated; one program for every i (jitted, so it also
    # works on arrays spread over several processes).
    self.copy_at = jax.jit(lambda tree, i: jax.tree.map(lambda x: x[i], tree),
                           out_shardings=self.replicated)

  def init_state(self, variables, seed) -> TrainState:
    """The initial state, replicated on the mesh.

    With copies, `variables` and `seed` are sequences (one per copy) and the state is
    their stack along a new leading axis.
    """
    if not self.copies:
      return self.replicate(create_state(variables, self.tx, seed))
    states = [jax.device_get(create_state(v, self.tx, s)) for v, s in zip(variables, seed)]
    return self.replicate(jax.tree.map(lambda *leaves: np.stack(leaves), *states))

  def replicate(self, tree):
    # Through host memory, so that every process contributes the same global value.
    return jax.device_put(jax.device_get(tree), self.replicated)

  def shard_batch(self, batch: Mapping) -> dict:
    """Places a single-process host batch on the mesh, split along 'data'."""
    return jax.device_put(dict(batch), self.batch_sharding)


_TRAINERS: dict = {}


def trainer_for(model: nn.Module, optimizer: OptimizerConfig,
                structure: structure_lib.Structure | None, mesh: Mesh,
                precision: str = 'float32', copies: bool = False) -> Trainer:
  """A Trainer shared by every fit that compiles to the same program.

  The key holds only what the compiled step depends on: the model, the optimizer settings
  `make_optimizer` builds in (not the learning rate, its schedule or the run's length,
  which are step inputs), the structure, the mesh and the precision. So N seeds trained
  one after another, and every regime that trains the same widths, compile each step once.
  """
  key = (repr(model),
         (optimizer.momentum, optimizer.nesterov, optimizer.weight_decay, optimizer.bn_l1),
         None if structure is None else (tuple(structure.widths.items()), structure.prunable),
         tuple(d.id for d in mesh.devices.flat), mesh.axis_names, precision, copies)
  if key not in _TRAINERS:
    _TRAINERS[key] = Trainer(model, make_optimizer(optimizer), structure, mesh, precision, copies)
  return _TRAINERS[key]


# ----------------------------------------------------------------------------- fit


StepHook = Callable[[TrainState, Mapping, Masks, Any], tuple[Masks, Any]]
EpochCallback = Callable[[TrainState, dict], None]


def _zero_sums(copies: int | None = None) -> dict:
  """Sums of the epoch's per-step metrics (checkpointed: a resumed epoch logs the same)."""
  shape = () if copies is None else (copies,)
  return {'loss': np.zeros(shape, np.float32), 'accuracy': np.zeros(shape, np.float32)}


def _as_masks(masks: Masks) -> Masks:
  # One dtype, so that masks a hook returns do not trigger a recompilation.
  return None if masks is None else {g: np.asarray(m, np.float32) for g, m in masks.items()}


def _format_seconds(seconds: float) -> str:
  minutes, s = divmod(int(seconds), 60)
  hours, m = divmod(minutes, 60)
  return f'{hours}h{m:02d}m{s:02d}s' if hours else f'{m}m{s:02d}s'


def _progress_bar(total: int, initial: int):
  if jax.process_index() != 0 or not sys.stderr.isatty():
    return None
  import tqdm  # Installed with tensorflow-datasets; only needed on a terminal.
  return tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True)


_EPOCH_FNS: dict = {}


def _epoch_fns(trainer: Trainer, arrays: Mapping, spec: data.DataSpec, batch_size: int):
  """Jitted (permutation, batch) makers for the device-resident training set.

  With a copies trainer both are vmapped over the stacked states' keys: each copy gets
  the permutation and augmentation its own run would draw. Shared by every fit with the
  same set size, batch size, spec and shardings (the seeds and regimes of a run): made
  anew per fit, they compiled twice per fit, 8 s of a five-seed resnet20 run.
  """
  images, labels = arrays['train_images'], arrays['train_labels']
  key = (int(labels.shape[0]), batch_size, spec, trainer.copies, trainer.replicated,
         trainer.batch_sharding)
  if key not in _EPOCH_FNS:
    _EPOCH_FNS[key] = _make_epoch_fns(*key)
  permutation, make_batch = _EPOCH_FNS[key]
  return permutation, functools.partial(make_batch, images, labels)


def _make_epoch_fns(n: int, batch_size: int, spec: data.DataSpec, copies: bool,
                    replicated: NamedSharding, batch_sharding: NamedSharding):

  def permutation(rng, epoch):
    return data.epoch_permutation(epoch_keys(rng, epoch)[0], n, batch_size)

  def make_batch(images, labels, order, rng, step):
    steps_per_epoch = order.shape[0]
    epoch, index = step // steps_per_epoch, step % steps_per_epoch
    key = jax.random.fold_in(epoch_keys(rng, epoch)[1], index)
    return data.train_batch(images, labels, order[index], key, spec)

  if copies:
    permutation = jax.vmap(permutation, in_axes=(0, None))
    make_batch = jax.vmap(make_batch, in_axes=(None, None, 0, 0, None))
  return (jax.jit(permutation, out_shardings=replicated),
          jax.jit(make_batch, out_shardings=batch_sharding))


def evaluate(trainer: Trainer, state: TrainState, arrays: Mapping, spec: data.DataSpec,
             masks: Masks, batch_size: int) -> dict:
  """Test-set {'loss', 'accuracy'} of the state (one host sync at the end).

  Floats; with a copies trainer, float arrays with one entry per copy.
  """
  sums = None
  for batch in data.eval_batches(arrays['test_images'], arrays['test_labels'], batch_size, spec):
    out = trainer.eval_step(state, batch, masks)
    sums = out if sums is None else trainer.add(sums, out)
  sums = jax.device_get(sums)
  loss, accuracy = sums['loss_sum'] / sums['count'], sums['correct'] / sums['count']
  if trainer.copies:
    return {'loss': np.asarray(loss, float), 'accuracy': np.asarray(accuracy, float)}
  return {'loss': float(loss), 'accuracy': float(accuracy)}


def fit(model: nn.Module, variables: Mapping, arrays: Mapping, spec: data.DataSpec, *,
        epochs: int, batch_size: int, optimizer: OptimizerConfig, stage_dir, seed: int = 0,
        masks: Masks = None, structure: structure_lib.Structure | None = None,
        step_hook: StepHook | None = None,
        hook_state: Any = None, callbacks: Sequence[EpochCallback] = (),
        mesh: Mesh | None = None, eval_batch_size: int | None = None,
        max_to_keep: int = 2, precision: str = 'float32') -> tuple[dict, dict]:
  """Trains `model` from `variables`; resumable, and a no-op for a stage already done.

  Args:
    model: the Flax model.
    variables: its initial variables (params, batch_stats, other collections).
    arrays: the dataset on device, `data.device_put_dataset(ds)` (placed replicated on
      the mesh if it is not already).
    spec: `ds.spec`, the augmentation and normalisation of `data.train_batch`.
    epochs, batch_size: length of training; batch_size is global (over all devices)
      and the last partial batch of an epoch is dropped.
    optimizer: the `OptimizerConfig`; its schedule is evaluated once for every step.
    stage_dir: directory (local or gs://) for checkpoints, metrics.jsonl, final/ and result.json.
    seed: the run's seed; permutations and augmentations derive from (seed, epoch, step).
    masks: {group: (C,)} masks applied throughout; removed channels' parameters stay fixed.
      Give all-ones masks for every group a `step_hook` may prune later.
    structure: the model's structure (derived when masks are given and it is not).
    step_hook: called after every step as `hook(state, batch, masks, hook_state) ->
      (masks, hook_state)`; new mask values (same shapes) take effect from the next step
      without recompiling. Both are checkpointed, so a hook whose state is a pytree of
      arrays resumes exactly. It should avoid host syncs on most steps.
    hook_state: the hook's initial state (a pytree of arrays, or None).
    callbacks: called after every epoch (after its checkpoint is started) with the
      state and the epoch's record.
    mesh: devices to train on (default: all, `make_mesh()`).
    eval_batch_size: test batch size (default: batch_size).
    max_to_keep: epoch checkpoints kept.
    precision: the compute dtype of training and evaluation, one of PRECISIONS.

  Returns:
    (variables, result): final variables, and {'test_accuracy', 'test_loss',
    'train_loss', 'train_accuracy', 'epochs', 'steps', 'wall_time_s', ...}, also
    written to result.json. If result.json already exists nothing is trained: the
    saved final variables and result are returned.

  Raises:
    checkpoint.Preempted: after saving on SIGTERM (a SystemExit(0): uncaught, the
      process exits cleanly and a rerun resumes from that step).
  """
  stage = checkpoint.stage_path(stage_dir)
  if checkpoint.is_done(stage):
    logging.info('Stage %s is done; using its saved result.', stage)
    return (checkpoint.load_variables(stage / checkpoint.FINAL, like=variables),
            checkpoint.read_result(stage))
  masks = _as_masks(masks)
  if masks and structure is None:
    structure = structure_lib.derive(model, tuple(arrays['train_images'].shape[1:]))
  if structure is not None and dict(structure.widths) != widths_of(model):
    raise ValueError('the structure was derived for other widths than the model has.')
  [trained] = _train(model, [variables], [seed], [stage], stage, copies=False, epochs=epochs,
                     batch_size=batch_size, optimizer=optimizer, arrays=arrays, spec=spec,
                     masks=masks, structure=structure, step_hook=step_hook,
                     hook_state=hook_state, callbacks=callbacks, mesh=mesh,
                     eval_batch_size=eval_batch_size, max_to_keep=max_to_keep,
                     precision=precision)
  return trained


def fit_copies(model: nn.Module, variables: Sequence[Mapping], arrays: Mapping,
               spec: data.DataSpec, *, epochs: int, batch_size: int, optimizer: OptimizerConfig,
               stage_dirs: Sequence, seeds: Sequence[int], checkpoint_dir,
               mesh: Mesh | None = None, eval_batch_size: int | None = None,
               max_to_keep: int = 2, precision: str = 'float32') -> list[tuple[dict, dict]]:
  """Trains K independent copies of `model` as one program, vmapped over the copies.

  Copy i is the run `fit(model, variables[i], ..., stage_dir=stage_dirs[i],
  seed=seeds[i])`: same initial variables, data order and augmentation, and its stage
  directory ends the same way (metrics.jsonl, final/, result.json), so a later `fit` of
  that stage only loads it. Its numbers agree with the separate run up to float
  rounding (the vmapped step may sum in another order), not bit for bit. Every copy
  has the same widths and settings; masks and step hooks are not supported.

  The group's training checkpoints live in checkpoint_dir/copies-<seeds> (resumable
  like `fit`'s). When every stage is done they are only loaded; a group stopped after
  some of its copies were written resumes, and the written ones are left as they are.

  Returns:
    [(variables, result)] per copy, as `fit` returns them.
  """
  stages = [checkpoint.stage_path(d) for d in stage_dirs]
  if not len(stages) == len(variables) == len(seeds):
    raise ValueError(f'fit_copies got {len(variables)} variables, {len(seeds)} seeds and '
                     f'{len(stages)} stage directories; it needs one of each per copy.')
  if all(checkpoint.is_done(stage) for stage in stages):
    logging.info('Stages %s are done; using their saved results.', [str(s) for s in stages])
    return [(checkpoint.load_variables(stage / checkpoint.FINAL, like=v),
             checkpoint.read_result(stage)) for stage, v in zip(stages, variables)]
  for stage in stages:
    stage.mkdir(parents=True, exist_ok=True)
  # Named by every copy, so a group stopped between its copies' final writes resumes
  # from its last checkpoint and writes only what is missing.
  group = checkpoint.stage_path(checkpoint_dir) / ('copies-' + '-'.join(map(str, seeds)))
  return _train(model, list(variables), list(seeds), stages, group, copies=True, epochs=epochs,
                batch_size=batch_size, optimizer=optimizer, arrays=arrays, spec=spec,
                masks=None, structure=None, step_hook=None, hook_state=None, callbacks=(),
                mesh=mesh, eval_batch_size=eval_batch_size, max_to_keep=max_to_keep,
                precision=precision)


def _train(model, inits, seeds, stages, checkpoint_stage, *, copies: bool, epochs, batch_size,
           optimizer, arrays, spec, masks, structure, step_hook, hook_state, callbacks, mesh,
           eval_batch_size, max_to_keep, precision) -> list[tuple[dict, dict]]:
  """The training loop of `fit` (one run) and `fit_copies` (K vmapped runs).

  Training checkpoints go to `checkpoint_stage`; each copy's metrics.jsonl, final/ and
  result.json to its entry of `stages`.
  """
  if epochs < 1:
    raise ConfigError(f"epochs must be at least 1, got {epochs}.")
  steps_per_epoch = data.steps_per_epoch(int(arrays['train_labels'].shape[0]), batch_size)
  mesh = mesh if mesh is not None else make_mesh()
  eval_batch_size = eval_batch_size or batch_size
  for name, size in (('batch size', batch_size), ('eval batch size', eval_batch_size)):
    if size % mesh.size:
      raise ConfigError(f"{name} {size} is not divisible by the {mesh.size} devices.")
  total_steps = epochs * steps_per_epoch
  count = len(stages)

  rates = learning_rates(optimizer, epochs, steps_per_epoch)
  trainer = trainer_for(model, optimizer, structure, mesh, precision, copies)
  arrays = jax.device_put(dict(arrays), trainer.replicated)
  permutation, make_batch = _epoch_fns(trainer, arrays, spec, batch_size)

  run = checkpoint.RunCheckpoints(checkpoint_stage, max_to_keep)
  bar = None
  # The guard is up before restoring, so a SIGTERM during start-up is not lost.
  with checkpoint.PreemptionGuard() as guard:
    try:
      initial = (trainer.init_state(inits, seeds) if copies
                 else trainer.init_state(inits[0], seeds[0]))
      carry = {'train': initial, 'masks': trainer.replicate(masks),
               'hook': trainer.replicate(hook_state),
               'sums': trainer.replicate(_zero_sums(count if copies else None))}
      # One run's log holds its records; a group's, one list of records per copy.
      log = {'records': [[] for _ in stages] if copies else [], 'elapsed_s': 0.0}
      restored = run.restore_latest(carry)
      if restored is not None:
        carry, log = restored
        logging.info('Resuming %s from step %d.', checkpoint_stage, run.latest_step())
      state, masks, hook_state, sums = carry['train'], carry['masks'], carry['hook'], carry['sums']
      histories = [list(r) for r in log['records']] if copies else [list(log['records'])]
      step = int(np.reshape(jax.device_get(state.step), -1)[0])
      run_start, elapsed_before = time.time(), float(log['elapsed_s'])

      def elapsed():
        return elapsed_before + time.time() - run_start

      def save(at_step):
        run.save(at_step, {'train': state, 'masks': masks, 'hook': hook_state, 'sums': sums},
                 {'records': histories if copies else histories[0], 'elapsed_s': elapsed()})

      def stop_if_preempted(at_step, saved):
        # Called once for every step number, as the multi-process sync point requires.
        if guard.reached(at_step):
          if not saved:
            save(at_step)
          run.wait()
          logging.warning('Preempted: saved step %d of %d in %s.', at_step, total_steps,
                          checkpoint_stage)
          raise checkpoint.Preempted(at_step)

      bar = _progress_bar(total_steps, step)
      while step < total_steps:
        epoch = step // steps_per_epoch
        epoch_end = (epoch + 1) * steps_per_epoch
        order = permutation(state.rng, epoch)
        epoch_start, first_step = time.time(), step
        while step < epoch_end:
          batch = make_batch(order, state.rng, step)
          state, metrics = trainer.train_step(state, batch, masks, rates[step])
          sums = trainer.add(sums, metrics)
          step += 1
          if step_hook is not None:
            masks, hook_state = step_hook(state, batch, masks, hook_state)
          if bar is not None:
            bar.update(1)
          if step < epoch_end:
            stop_if_preempted(step, saved=False)
        totals = jax.device_get(sums)  # The epoch's one wait for the device.
        train_time = time.time() - epoch_start
        test = evaluate(trainer, state, arrays, spec, masks, eval_batch_size)
        values = {'train_loss': totals['loss'] / steps_per_epoch,
                  'train_accuracy': totals['accuracy'] / steps_per_epoch,
                  'test_loss': test['loss'], 'test_accuracy': test['accuracy']}
        for i, history in enumerate(histories):
          history.append({
              'epoch': epoch + 1, 'step': step,
              **{name: float(np.reshape(v, -1)[i]) for name, v in values.items()},
              'learning_rate': float(rates[step - 1]),
              'images_per_second': (step - first_step) * batch_size / train_time,
              'elapsed_s': elapsed(),
          })
        sums = trainer.replicate(_zero_sums(count if copies else None))
        save(step)
        for stage, history in zip(stages, histories):
          checkpoint.write_metrics(stage, history)
        eta = (epochs - epoch - 1) * (time.time() - epoch_start)
        test_accuracies = ' '.join(f'{history[-1]["test_accuracy"]:.4f}' for history in histories)
        logging.info('epoch %d/%d  loss %.4f  acc %.4f  test loss %.4f  test acc %s  lr %.3g  '
                     '%.0f img/s%s  eta %s', epoch + 1, epochs, np.mean(values['train_loss']),
                     np.mean(values['train_accuracy']), np.mean(values['test_loss']),
                     test_accuracies, float(rates[step - 1]),
                     histories[0][-1]['images_per_second'] * count,
                     f' ({count} copies; losses are means)' if copies else '',
                     _format_seconds(eta))
        for callback in callbacks:
          callback(state, histories[0][-1])
        if step < total_steps:
          stop_if_preempted(step, saved=True)
      run.wait()
    finally:
      if bar is not None:
        bar.close()
      run.close()

  outputs = []
  for i, (stage, history) in enumerate(zip(stages, histories)):
    variables = trainer.copy_at(state.variables, i) if copies else state.variables
    if checkpoint.is_done(stage):
      # A copy written before the group stopped: its saved result stands.
      outputs.append((variables, checkpoint.read_result(stage)))
      continue
    final = history[-1]
    result = {
        'test_accuracy': final['test_accuracy'], 'test_loss': final['test_loss'],
        'train_accuracy': final['train_accuracy'], 'train_loss': final['train_loss'],
        'epochs': epochs, 'steps': total_steps, 'batch_size': batch_size, 'seed': seeds[i],
        'wall_time_s': final['elapsed_s'],
    }
    checkpoint.save_variables(stage / checkpoint.FINAL, variables)
    checkpoint.mark_done(stage, result)
    outputs.append((variables, result))
  if guard.signalled:
    # SIGTERM during the last step: the stage is finished and saved, but the process must
    # still stop rather than start the next stage.
    logging.warning('Preempted after the last step; %s is finished.', checkpoint_stage)
    raise checkpoint.Preempted(total_steps)
  return outputs
