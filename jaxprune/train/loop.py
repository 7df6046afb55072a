"""`fit`: the resumable training loop every stage uses (one run, or K vmapped copies).

`fit` shuffles and augments on device, checkpoints every epoch (resuming after a crash or
preemption) and leaves metrics.jsonl, TensorBoard events and result.json in the stage
directory. `fit_copies` trains K runs of equal widths (e.g. K seeds) as one vmapped
program through the same loop, leaving each run's stage directory as its own `fit` would.
`evaluate_variables` is the test-set evaluation of the loop and of any saved variables.
The events are written by tensorboardX, a small pure-Python writer without TensorFlow.

A call of the loop restores the latest checkpoint (`_restore`), then per epoch trains
(`_train_epoch`: calls of `steps_per_call` steps, each one compiled loop on the device, or
one step per call for a fit with a step hook; one wait for the device per call), checks the
loss was finite
(`_check_finite`), evaluates and records (`_record_epoch`), and at the end writes each
copy's final variables and result (`_finish`). `fit` is the case K = 1.
"""

import dataclasses
import functools
import itertools
import json
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorboardX
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding

from jaxprune import data
from jaxprune.errors import ConfigError, Diverged, Interrupted, Preempted
from jaxprune.kernels import compiler
from jaxprune.models import widths_of
from jaxprune.prune import program
from jaxprune.prune import structure as structure_lib
from jaxprune.train import checkpoint
from jaxprune.train.optim import OptimizerConfig, learning_rates
from jaxprune.train.step import (Evaluator, Masks, Trainer, TrainState, compute_dtype, epoch_keys,
                                 evaluator_for, make_mesh, trainer_for)

StepHook = Callable[[TrainState, Mapping, Masks, Any], tuple[Masks, Any]]
EpochCallback = Callable[[TrainState, dict], None]


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  """How a stage trains, apart from the model, its data and where it writes.

  Attributes:
    epochs: length of training.
    batch_size: the global training batch (over all devices); the last partial batch
      of an epoch is dropped.
    optimizer: the `OptimizerConfig`; its schedule is evaluated once for every step.
    precision: the compute dtype of training and evaluation, one of PRECISIONS.
    eval_batch_size: the test batch (default: batch_size).
    max_to_keep: epoch checkpoints kept.
    steps_per_call: training steps per compiled call: one `lax.fori_loop` on the device
      that makes each batch, looks up its learning rate, steps and adds its metrics; a
      call never crosses an epoch's end. Every call length runs the same program, so every
      value above 1 (and a resume at any step) gives the same bits; against stepping one by one
      (1, a separate program per step) they agree up to float rounding, because XLA
      compiles a loop body's convolutions and fusions differently from a lone step's. The host notices a SIGTERM or Ctrl-C between calls, so
      preemption saves at most this many steps (one call) after the signal, or, in the
      epoch's last call, after the epoch's evaluation and checkpoint. A fit with a
      `step_hook` steps one by one whatever this says (the hook runs on the host).
      None: `default_steps_per_call` of the backend.
  """
  epochs: int
  batch_size: int
  optimizer: OptimizerConfig = OptimizerConfig()
  precision: str = 'float32'
  eval_batch_size: int | None = None
  max_to_keep: int = 2
  steps_per_call: int | None = None

  def __post_init__(self):
    for name in ('epochs', 'batch_size', 'eval_batch_size', 'max_to_keep', 'steps_per_call'):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}.", settings=(name,))
    compute_dtype(self.precision)

  @property
  def test_batch_size(self) -> int:
    return self.eval_batch_size or self.batch_size


def default_steps_per_call(backend: str) -> int:
  """`TrainOptions.steps_per_call` when none is given: 10 on CPUs, 50 on GPUs and TPUs.

  On the CPU, calls of 10 steps ran 1.14-1.26x the images/s of stepping one by one
  (resnet20, resnet56, vgg16 at batch 64 and 128 on CIFAR-10; experiments/bench/README.md,
  section 13), and a SIGTERM waits for at most one call, seconds there. On an accelerator
  a CIFAR step takes milliseconds and a call per step keeps the device waiting on the host;
  50 steps are then well under a second, far inside a preemption's notice.
  """
  return 10 if backend == 'cpu' else 50


# What `_finish` writes to result.json; a caller's `record` may not use these keys.
_RESULT_KEYS = ('test_accuracy', 'test_loss', 'best_test_accuracy', 'best_epoch',
                'train_accuracy', 'train_loss', 'epochs', 'steps', 'batch_size', 'seed',
                'wall_time_s')
_TRAIN_SET = ('train_images', 'train_labels')
_TEST_SET = ('test_images', 'test_labels')


def _check_divisible(name: str, size: int, mesh: Mesh) -> None:
  if size % mesh.size:
    raise ConfigError(f"{name} {size} is not divisible by the {mesh.size} devices.",
                      settings=(name,))


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


# ----------------------------------------------------------------------------- device data

_PLACED: dict = {}
_PLACED_KEPT = 2


def _on_mesh(arrays: Mapping, names: Sequence[str], sharding: NamedSharding) -> dict:
  """{name: arrays[name]} for `names`, replicated with `sharding`.

  Arrays placed so already are used as they are. Others (host arrays, another mesh) are
  copied once per source and sharding and kept for the last few datasets, so evaluating
  one test set again and again copies it once.
  """
  sources = tuple(arrays[name] for name in names)
  if all(getattr(x, 'sharding', None) == sharding for x in sources):
    return dict(zip(names, sources))
  key = (tuple(map(id, sources)), sharding)
  if key not in _PLACED:
    if len(_PLACED) >= _PLACED_KEPT:
      _PLACED.pop(next(iter(_PLACED)))
    # The sources stay referenced by their entry, so no other array can take their ids.
    _PLACED[key] = (sources, jax.device_put(dict(zip(names, sources)), sharding))
  return _PLACED[key][1]


_EPOCH_FNS: dict = {}


def epoch_programs(trainer: Trainer, train_set: Mapping, spec: data.DataSpec, batch_size: int):
  """Jitted (permutation, batch) makers for the device-resident training set.

  With a copies trainer both are vmapped over the stacked states' keys: each copy gets
  the permutation and augmentation its own run would draw. Shared by every fit with the
  same set size, batch size, spec and shardings (the seeds and regimes of a run): made
  anew per fit, they compiled twice per fit, 8 s of a five-seed resnet20 run.
  """
  images, labels = train_set['train_images'], train_set['train_labels']
  key = (int(labels.shape[0]), batch_size, spec, trainer.copies, trainer.replicated,
         trainer.batch_sharding)
  if key not in _EPOCH_FNS:
    _EPOCH_FNS[key] = _make_epoch_fns(*key)
  permutation, make_batch = _EPOCH_FNS[key]
  return permutation, functools.partial(make_batch, images, labels)


def _batch_maker(spec: data.DataSpec, copies: bool) -> Callable:
  """`make_batch(images, labels, order, rng, step)`: step `step`'s augmented batch (pure).

  With copies it is vmapped over the orders and keys: each copy's own batch.
  """
  def make_batch(images, labels, order, rng, step):
    steps_per_epoch = order.shape[0]
    epoch, index = step // steps_per_epoch, step % steps_per_epoch
    key = jax.random.fold_in(epoch_keys(rng, epoch)[1], index)
    return data.train_batch(images, labels, order[index], key, spec)

  return jax.vmap(make_batch, in_axes=(None, None, 0, 0, None)) if copies else make_batch


def _make_epoch_fns(n: int, batch_size: int, spec: data.DataSpec, copies: bool,
                    replicated: NamedSharding, batch_sharding: NamedSharding):

  def permutation(rng, epoch):
    return data.epoch_permutation(epoch_keys(rng, epoch)[0], n, batch_size)

  if copies:
    permutation = jax.vmap(permutation, in_axes=(0, None))
  return (jax.jit(permutation, out_shardings=replicated),
          jax.jit(_batch_maker(spec, copies), out_shardings=batch_sharding))


_TRAIN_CALLS: dict = {}


def train_calls(trainer: Trainer, spec: data.DataSpec) -> Callable:
  """The jitted program of many steps, `sharded_train_steps(state, sums, first_nonfinite,
  masks, images, labels, order, rates, start, stop)`: trains steps start..stop-1 of the epoch
  whose permutation is `order` and returns the new (state, sums, first_nonfinite).

  Each step is the step-by-step loop's make_batch, train_step and `_add_metrics`, in one
  `lax.fori_loop`; `rates` are the epoch's learning rates, one per step (so fits of other
  lengths share the program). start and stop are inputs, so every call length (a short
  last call, a resumed epoch) runs the same compiled program;
  state, sums and first_nonfinite are donated. Shared by every fit with this trainer and spec.
  """
  key = (trainer, spec)
  if key not in _TRAIN_CALLS:
    make_batch = _batch_maker(spec, trainer.copies)

    def sharded_train_steps(state, sums, first_nonfinite, masks, images, labels, order, rates,
                            start, stop):
      def one_step(step, carry):
        state, sums, first_nonfinite = carry
        batch = make_batch(images, labels, order, state.rng, step)
        state, metrics = trainer.sharded_train_step(state, batch, masks,
                                                    rates[step % rates.shape[0]])
        return (state, *_add_metrics(sums, first_nonfinite, metrics, state.step))

      return jax.lax.fori_loop(start, stop, one_step, (state, sums, first_nonfinite))

    _TRAIN_CALLS[key] = compiler.jit(sharded_train_steps, xla_options=trainer.xla_options,
                                     donate_argnums=(0, 1, 2), out_shardings=trainer.replicated)
  return _TRAIN_CALLS[key]


# ----------------------------------------------------------------------------- evaluation


def _evaluate(evaluator: Evaluator, variables, test_set: Mapping, spec: data.DataSpec,
              masks: Masks, batch_size: int) -> dict:
  """Test-set {'loss', 'accuracy'}: float arrays, shape (K,) with copies, else ().

  The batches' sums stay on device; the one host sync is at the end.
  """
  sums = None
  for batch in data.eval_batches(test_set['test_images'], test_set['test_labels'], batch_size,
                                 spec):
    out = evaluator.eval_step(variables, batch, masks)
    sums = out if sums is None else evaluator.add(sums, out)
  sums = jax.device_get(sums)
  return {'loss': np.asarray(sums['loss_sum'] / sums['count'], float),
          'accuracy': np.asarray(sums['correct'] / sums['count'], float)}


def evaluate_variables(model: nn.Module, variables: Mapping, arrays: Mapping,
                       spec: data.DataSpec, *, batch_size: int, precision: str = 'float32',
                       mesh: Mesh | None = None) -> dict:
  """Test-set {'loss': float, 'accuracy': float} of `model` with `variables` (eval mode).

  The same compiled step as `fit`'s per-epoch evaluation of that model, precision and
  mesh (`evaluator_for`). `arrays` holds 'test_images' and 'test_labels'
  (`data.device_put_dataset(ds)`, or host arrays, copied to the mesh once per dataset);
  `batch_size` is global, divisible by the devices, the last batch padded.
  """
  mesh = mesh if mesh is not None else make_mesh()
  _check_divisible('batch_size', batch_size, mesh)
  evaluator = evaluator_for(model, mesh, precision)
  test_set = _on_mesh(arrays, _TEST_SET, evaluator.replicated)
  variables = jax.device_put(dict(variables), evaluator.replicated)
  test = _evaluate(evaluator, variables, test_set, spec, None, batch_size)
  return {name: float(value) for name, value in test.items()}


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class _Copies:
  """The K runs one call of the loop trains, and where each writes.

  Attributes:
    inits, seeds, stages: per copy, its initial variables, seed and stage directory
      (metrics.jsonl, tensorboard/, final/, result.json).
    group: the stage directory of the training checkpoints (a copy's own for `fit`).
    vmapped: whether the copies train vmapped (`fit_copies`, any K) or alone (`fit`).
    record: extra entries of every copy's result.json.
  """
  inits: Sequence[Mapping]
  seeds: Sequence[int]
  stages: Sequence[epath.Path]
  group: epath.Path
  vmapped: bool
  record: Mapping[str, Any]


@dataclasses.dataclass
class _Run:
  """What stays fixed while the loop runs: the copies, the compiled pieces, the schedule.

  `train_calls` is the program `train_calls(trainer, spec)` makes, or None where the loop
  steps one by one (steps_per_call 1, or a step hook); `steps_per_call` is the options' or the backend's.
  """
  copies: _Copies
  options: TrainOptions
  trainer: Trainer
  spec: data.DataSpec
  rates: np.ndarray
  steps_per_epoch: int
  permutation: Callable
  make_batch: Callable
  train_set: dict
  test_set: dict
  checkpoints: checkpoint.RunCheckpoints
  step_hook: StepHook | None
  callbacks: Sequence[EpochCallback]
  train_calls: Callable | None
  steps_per_call: int

  @property
  def total_steps(self) -> int:
    return self.options.epochs * self.steps_per_epoch

  @property
  def copy_shape(self) -> tuple[int, ...]:
    """The leading shape of per-copy values on device: (K,) vmapped, () alone."""
    return (len(self.copies.stages),) if self.copies.vmapped else ()

  def zero_sums(self) -> dict:
    """Sums of the epoch's per-step metrics (checkpointed: a resumed epoch logs the same)."""
    return self.trainer.replicate({'loss': np.zeros(self.copy_shape, np.float32),
                                   'accuracy': np.zeros(self.copy_shape, np.float32)})


@dataclasses.dataclass
class _Progress:
  """Where the run is: the checkpointed carry, the copies' epoch records and the clock.

  `first_nonfinite` holds, per copy on device, the first step of the current epoch whose
  loss was not finite (0: none yet). It is not checkpointed: no checkpoint is saved
  while it is set.
  """
  step: int
  state: TrainState
  masks: Masks
  hook_state: Any
  sums: dict
  first_nonfinite: jax.Array
  histories: list[list[dict]]
  elapsed_before: float
  started: float = dataclasses.field(default_factory=time.time)

  def elapsed(self) -> float:
    return self.elapsed_before + time.time() - self.started

  def carry(self) -> dict:
    return {'train': self.state, 'masks': self.masks, 'hook': self.hook_state, 'sums': self.sums}


def _add_metrics(sums, first_nonfinite, metrics, step):
  """Adds a step's metrics to the epoch's sums; notes `step` if its loss is the first non-finite."""
  bad = (first_nonfinite == 0) & ~jnp.isfinite(metrics['loss'])
  return jax.tree.map(jnp.add, sums, metrics), jnp.where(bad, step, first_nonfinite)


accumulate_metrics = jax.jit(_add_metrics, donate_argnums=(0, 1))


class _Clock:
  """Seconds per step for the ETA, without the compilations of this call's first epoch.

  The first step compiles the train step (and the batch makers), and the first evaluation
  the eval step, unless an earlier fit did; counted, they made the first epoch's ETA
  minutes when the run takes seconds. So the first epoch's rate is that of its training
  steps after the first, and each later epoch's that of the whole epoch before it
  (training, evaluation, checkpoint).
  """

  def __init__(self):
    self._start: tuple[float, int] | None = None
    self._lap: tuple[float, int] | None = None
    self._per_step: float | None = None

  def stepped(self, step: int) -> None:
    if self._start is None:
      self._start = (time.time(), step)

  def synced(self, step: int) -> None:
    """At the host sync of an epoch's training."""
    started, first = self._start
    if self._lap is None and step > first:
      self._per_step = (time.time() - started) / (step - first)

  def lap(self, step: int, total_steps: int) -> str:
    """At an epoch's end: the ETA of the remaining steps."""
    now = time.time()
    if self._lap is not None:
      self._per_step = (now - self._lap[0]) / (step - self._lap[1])
    self._lap = (now, step)
    return '?' if self._per_step is None else _format_seconds((total_steps - step) * self._per_step)


_WRITERS_OPENED = itertools.count()


class _Boards:
  """Each copy's TensorBoard writer in its stage's tensorboard/ (process 0, local stages).

  A resumed run purges the events its earlier attempts wrote after the step it resumes
  from (they may be of steps it trains again).
  """

  def __init__(self, stages: Sequence[epath.Path], resumed_step: int):
    self._writers, self._logdirs = [], []
    if jax.process_index() != 0:
      return
    remote = [str(stage) for stage in stages if '://' in str(stage)]
    if remote:
      logging.warning('Writing no TensorBoard events for %s: tensorboardX writes to local '
                      'directories only.', ', '.join(remote))
    purge = resumed_step + 1 if resumed_step else None
    # tensorboardX names a file by the second it opened it; an attempt resumed within the
    # same second would overwrite the earlier attempt's file without a suffix of its own.
    self._logdirs = [stage / checkpoint.TENSORBOARD for stage in stages]
    self._writers = [None if '://' in str(stage) else tensorboardX.SummaryWriter(
        logdir=str(logdir), purge_step=purge,
        filename_suffix=f'.{os.getpid()}.{next(_WRITERS_OPENED)}')
        for stage, logdir in zip(stages, self._logdirs)]

  def write(self, histories: Sequence[list[dict]]) -> None:
    """Writes each copy's latest epoch record at its optimizer step."""
    for writer, logdir, history in zip(self._writers, self._logdirs, histories):
      if writer is None:
        continue
      record = history[-1]
      with checkpoint.naming(logdir):
        for tag, name in (('train/loss', 'train_loss'), ('train/accuracy', 'train_accuracy'),
                          ('test/loss', 'test_loss'), ('test/accuracy', 'test_accuracy'),
                          ('learning_rate', 'learning_rate')):
          writer.add_scalar(tag, record[name], global_step=record['step'])

  def close(self) -> None:
    for writer, logdir in zip(self._writers, self._logdirs):
      if writer is not None:
        with checkpoint.naming(logdir):
          writer.close()


def _prepare(model: nn.Module, options: TrainOptions, arrays: Mapping, spec: data.DataSpec,
             copies: _Copies, structure, mesh: Mesh | None, step_hook, callbacks) -> _Run:
  """Checks the settings and builds (or takes from the caches) what the loop runs."""
  clash = sorted(set(copies.record) & set(_RESULT_KEYS))
  if clash:
    raise ValueError(f'record entries {clash} would replace what fit records in result.json.')
  json.dumps(dict(copies.record))  # A record that is not JSON fails now, not after training.
  mesh = mesh if mesh is not None else make_mesh()
  _check_divisible('batch_size', options.batch_size, mesh)
  _check_divisible('eval_batch_size', options.test_batch_size, mesh)
  steps_per_epoch = data.steps_per_epoch(int(arrays['train_labels'].shape[0]), options.batch_size)
  trainer = trainer_for(model, options.optimizer, structure, mesh, options.precision,
                        copies.vmapped)
  train_set = _on_mesh(arrays, _TRAIN_SET, trainer.replicated)
  permutation, make_batch = epoch_programs(trainer, train_set, spec, options.batch_size)
  rates = learning_rates(options.optimizer, options.epochs, steps_per_epoch)
  steps_per_call = options.steps_per_call or default_steps_per_call(jax.default_backend())
  in_calls = steps_per_call > 1 and step_hook is None
  return _Run(copies=copies, options=options, trainer=trainer, spec=spec, rates=rates,
              steps_per_epoch=steps_per_epoch, permutation=permutation, make_batch=make_batch,
              train_set=train_set, test_set=_on_mesh(arrays, _TEST_SET, trainer.replicated),
              checkpoints=checkpoint.RunCheckpoints(copies.group, options.max_to_keep),
              step_hook=step_hook, callbacks=callbacks,
              train_calls=train_calls(trainer, spec) if in_calls else None,
              steps_per_call=steps_per_call)


def _initial_state(run: _Run) -> TrainState:
  if run.copies.vmapped:
    return run.trainer.init_state(run.copies.inits, run.copies.seeds)
  [variables], [seed] = run.copies.inits, run.copies.seeds
  return run.trainer.init_state(variables, seed)


def _restore(run: _Run, masks: Masks, hook_state: Any) -> _Progress:
  """The copies' progress from the group's latest checkpoint, or their start if it has none."""
  trainer = run.trainer
  carry = {'train': _initial_state(run), 'masks': trainer.replicate(masks),
           'hook': trainer.replicate(hook_state), 'sums': run.zero_sums()}
  log = {'records': [[] for _ in run.copies.stages], 'elapsed_s': 0.0}
  restored = run.checkpoints.restore_latest(carry)
  if restored is not None:
    carry, log = restored
    logging.info('Resuming %s from step %d.', run.copies.group, run.checkpoints.latest_step())
  records = log['records']
  # `fit`'s checkpoints from before it shared this loop with fit_copies hold one flat list.
  if not records or isinstance(records[0], dict):
    records = [records]
  state = carry['train']
  return _Progress(step=int(np.reshape(jax.device_get(state.step), -1)[0]), state=state,
                   masks=carry['masks'], hook_state=carry['hook'], sums=carry['sums'],
                   first_nonfinite=trainer.replicate(np.zeros(run.copy_shape, np.int32)),
                   histories=[list(r) for r in records], elapsed_before=float(log['elapsed_s']))


def _save(run: _Run, progress: _Progress) -> None:
  """Starts saving the checkpoint of the current step (the carry and every copy's records)."""
  run.checkpoints.save(progress.step, progress.carry(),
                       {'records': progress.histories, 'elapsed_s': progress.elapsed()})


def _check_finite(run: _Run, first_nonfinite: np.ndarray) -> None:
  """Raises Diverged if a copy's loss was not finite, after marking that copy's stage.

  Nothing of the epoch is saved, so the last good checkpoint stays the latest and a
  rerun (e.g. with a smaller learning rate, a step input) resumes from it.
  """
  steps = np.reshape(first_nonfinite, -1)
  bad = [(stage, int(step)) for stage, step in zip(run.copies.stages, steps) if step]
  if not bad:
    return
  run.checkpoints.wait()
  resume_step = run.checkpoints.latest_step() or 0
  for stage, step in bad:
    checkpoint.mark_diverged(stage, epoch=(step - 1) // run.steps_per_epoch + 1, step=step,
                             resume_step=resume_step,
                             learning_rate=run.options.optimizer.learning_rate)
  stage, step = bad[0]
  raise Diverged(stage=str(stage), epoch=(step - 1) // run.steps_per_epoch + 1, step=step,
                 resume_step=resume_step)


def _stop_if_preempted(run: _Run, progress: _Progress, guard: checkpoint.PreemptionGuard,
                       saved: bool, asked_until: int) -> None:
  """After a SIGTERM: saves the step (unless `saved`) and raises Preempted.

  The guard is asked about every step number after `asked_until` up to the current one,
  as the multi-process sync point requires (each number once, in order); every process
  runs the same calls, so all stop after the call whose steps hold the agreed one.
  """
  steps = range(asked_until + 1, progress.step + 1)
  if not any(guard.reached(step) for step in steps):
    return
  if not saved:
    # Mid-epoch the loss has not been checked yet; a non-finite one is never saved.
    _check_finite(run, jax.device_get(progress.first_nonfinite))
    _save(run, progress)
  run.checkpoints.wait()
  logging.warning('Preempted: saved step %d of %d in %s.', progress.step, run.total_steps,
                  run.copies.group)
  stop = Interrupted if guard.interrupted else Preempted
  raise stop(progress.step, str(run.copies.group))


def _train_steps(run: _Run, progress: _Progress, order, epoch_rates, stop: int) -> None:
  """Trains steps progress.step..stop-1: one compiled call, or one step per call."""
  if run.train_calls is not None:
    progress.state, progress.sums, progress.first_nonfinite = run.train_calls(
        progress.state, progress.sums, progress.first_nonfinite, progress.masks,
        run.train_set['train_images'], run.train_set['train_labels'], order, epoch_rates,
        np.int32(progress.step), np.int32(stop))
    progress.step = stop
    return
  batch = run.make_batch(order, progress.state.rng, progress.step)
  progress.state, metrics = run.trainer.train_step(progress.state, batch, progress.masks,
                                                   run.rates[progress.step])
  progress.sums, progress.first_nonfinite = accumulate_metrics(
      progress.sums, progress.first_nonfinite, metrics, progress.state.step)
  progress.step += 1
  if run.step_hook is not None:
    progress.masks, progress.hook_state = run.step_hook(progress.state, batch, progress.masks,
                                                        progress.hook_state)


def _train_epoch(run: _Run, progress: _Progress, guard: checkpoint.PreemptionGuard, bar,
                 clock: _Clock) -> tuple[dict, int]:
  """Trains the rest of the current epoch.

  Returns its sums, fetched in its one host sync, and the last step number the guard was
  asked about (the epoch's last call's steps are asked about after its checkpoint).
  """
  epoch = progress.step // run.steps_per_epoch
  epoch_end = (epoch + 1) * run.steps_per_epoch
  per_call = 1 if run.train_calls is None else run.steps_per_call
  order = run.permutation(progress.state.rng, epoch)
  epoch_rates = (None if run.train_calls is None else jax.device_put(
      run.rates[epoch_end - run.steps_per_epoch:epoch_end], run.trainer.replicated))
  asked_until = progress.step
  while progress.step < epoch_end:
    start = progress.step
    _train_steps(run, progress, order, epoch_rates, min(start + per_call, epoch_end))
    if bar is not None:
      bar.update(progress.step - start)
    if run.train_calls is not None and progress.step < epoch_end:
      # The signal is looked at once the call has run, so the host never queues more than
      # one call ahead of the device: that is what bounds how late a SIGTERM is honoured.
      jax.block_until_ready(progress.first_nonfinite)
    clock.stepped(progress.step)
    if progress.step < epoch_end:
      _stop_if_preempted(run, progress, guard, saved=False, asked_until=asked_until)
      asked_until = progress.step
  totals = jax.device_get({**progress.sums, 'first_nonfinite': progress.first_nonfinite})
  clock.synced(progress.step)
  return totals, asked_until


def _record_epoch(run: _Run, progress: _Progress, totals: dict, test: dict,
                  images_per_second: float, boards: _Boards) -> None:
  """Appends the epoch's record to every copy's history, then saves the checkpoint,
  metrics.jsonl and the TensorBoard events."""
  step, per_epoch = progress.step, run.steps_per_epoch
  values = {'train_loss': totals['loss'] / per_epoch,
            'train_accuracy': totals['accuracy'] / per_epoch,
            'test_loss': test['loss'], 'test_accuracy': test['accuracy']}
  for i, history in enumerate(progress.histories):
    history.append({
        'epoch': step // per_epoch, 'step': step,
        **{name: float(np.reshape(v, -1)[i]) for name, v in values.items()},
        'learning_rate': float(run.rates[step - 1]),
        'images_per_second': images_per_second,
        'elapsed_s': progress.elapsed(),
    })
  progress.sums = run.zero_sums()
  _save(run, progress)
  for stage, history in zip(run.copies.stages, progress.histories):
    checkpoint.write_metrics(stage, history)
  boards.write(progress.histories)


def _log_epoch(run: _Run, progress: _Progress, clock: _Clock) -> None:
  records = [history[-1] for history in progress.histories]
  count = len(records)
  mean = lambda name: np.mean([r[name] for r in records])
  logging.info('epoch %d/%d  loss %.4f  acc %.4f  test loss %.4f  test acc %s  lr %.3g  '
               '%.0f img/s%s  eta %s', records[0]['epoch'], run.options.epochs,
               mean('train_loss'), mean('train_accuracy'), mean('test_loss'),
               ' '.join(f'{r["test_accuracy"]:.4f}' for r in records),
               records[0]['learning_rate'], records[0]['images_per_second'] * count,
               f' ({count} copies; losses are means)' if run.copies.vmapped else '',
               clock.lap(progress.step, run.total_steps))


def _finish(run: _Run, progress: _Progress) -> list[tuple[dict, dict]]:
  """Writes each copy's final/ and result.json (and drops its diverged.json)."""
  options = run.options
  outputs = []
  for i, (stage, seed, history) in enumerate(zip(run.copies.stages, run.copies.seeds,
                                                 progress.histories)):
    variables = run.trainer.variables_of(progress.state, i)
    if checkpoint.is_done(stage):
      # A copy written before the group stopped: its saved result stands.
      outputs.append((variables, checkpoint.read_result(stage)))
      continue
    final = history[-1]
    # [R]'s code reports the best epoch's test accuracy; the final one is ours.
    best = max(history, key=lambda r: r['test_accuracy'])
    result = {
        **run.copies.record,
        'test_accuracy': final['test_accuracy'], 'test_loss': final['test_loss'],
        'best_test_accuracy': best['test_accuracy'], 'best_epoch': best['epoch'],
        'train_accuracy': final['train_accuracy'], 'train_loss': final['train_loss'],
        'epochs': options.epochs, 'steps': run.total_steps, 'batch_size': options.batch_size,
        'seed': seed, 'wall_time_s': final['elapsed_s'],
    }
    checkpoint.save_variables(stage / checkpoint.FINAL, variables)
    checkpoint.clear_diverged(stage)
    checkpoint.mark_done(stage, result)
    outputs.append((variables, result))
  return outputs


def _train(run: _Run, masks: Masks, hook_state: Any) -> list[tuple[dict, dict]]:
  """The loop of `fit` and `fit_copies`: restore, then per epoch train, check, evaluate,
  record; then finish. Returns [(variables, result)] per copy."""
  options = run.options
  bar = boards = None
  # The guard is up before restoring, so a SIGTERM during start-up is not lost.
  with checkpoint.PreemptionGuard() as guard:
    try:
      progress = _restore(run, masks, hook_state)
      boards = _Boards(run.copies.stages, progress.step)
      bar = _progress_bar(run.total_steps, progress.step)
      clock = _Clock()
      while progress.step < run.total_steps:
        epoch_start, first_step = time.time(), progress.step
        totals, asked_until = _train_epoch(run, progress, guard, bar, clock)
        train_seconds = time.time() - epoch_start
        _check_finite(run, totals['first_nonfinite'])
        variables = progress.state.variables
        test = _evaluate(run.trainer.evaluator, variables, run.test_set, run.spec,
                         progress.masks, options.test_batch_size)
        images_per_second = (progress.step - first_step) * options.batch_size / train_seconds
        _record_epoch(run, progress, totals, test, images_per_second, boards)
        _log_epoch(run, progress, clock)
        for callback in run.callbacks:
          callback(progress.state, progress.histories[0][-1])
        if progress.step < run.total_steps:
          _stop_if_preempted(run, progress, guard, saved=True, asked_until=asked_until)
      run.checkpoints.wait()
    finally:
      if bar is not None:
        bar.close()
      if boards is not None:
        boards.close()
      run.checkpoints.close()
  outputs = _finish(run, progress)
  if guard.signalled:
    # SIGTERM during the last step: the stage is finished and saved, but the process must
    # still stop rather than start the next stage.
    logging.warning('Preempted after the last step; %s is finished.', run.copies.group)
    stop = Interrupted if guard.interrupted else Preempted
    raise stop(run.total_steps, str(run.copies.group))
  return outputs


def fit(model: nn.Module, variables: Mapping, arrays: Mapping, spec: data.DataSpec,
        options: TrainOptions, *, stage_dir, seed: int = 0, masks: Masks = None,
        structure: structure_lib.Structure | None = None, step_hook: StepHook | None = None,
        hook_state: Any = None, callbacks: Sequence[EpochCallback] = (),
        mesh: Mesh | None = None, record: Mapping | None = None) -> tuple[dict, dict]:
  """Trains `model` from `variables`; resumable, and a no-op for a stage already done.

  Args:
    model: the Flax model.
    variables: its initial variables (params, batch_stats, other collections).
    arrays: the dataset on device, `data.device_put_dataset(ds)` (placed replicated on
      the mesh if it is not already).
    spec: `ds.spec`, the augmentation and normalisation of `data.train_batch`.
    options: the `TrainOptions` (length, batch size, optimizer, precision).
    stage_dir: directory (local or gs://) for checkpoints, metrics.jsonl, tensorboard/
      (local only), final/ and result.json.
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
    record: extra JSON-able entries of result.json (e.g. the performance options).

  Returns:
    (variables, result): final variables, and {'test_accuracy', 'test_loss',
    'train_loss', 'train_accuracy', 'epochs', 'steps', 'wall_time_s', ...}, also
    written to result.json. If result.json already exists nothing is trained: the
    saved final variables and result are returned.

  Raises:
    errors.Preempted: after saving on SIGTERM; a rerun resumes from that step.
    errors.Diverged: an epoch's loss was not finite. Nothing of that epoch is saved and
      stage_dir/diverged.json says where; a rerun (e.g. with a smaller learning rate)
      resumes from the last good checkpoint, and diverged.json goes when the stage finishes.
  """
  stage = checkpoint.stage_path(stage_dir)
  if checkpoint.is_done(stage):
    final = checkpoint.load_final(stage, like=variables)
    if final is not None:
      logging.info('Stage %s is done; using its saved result.', stage)
      return final, checkpoint.read_result(stage)
  masks = _as_masks(masks)
  if masks and structure is None:
    structure = program.derive(model, tuple(arrays['train_images'].shape[1:])).structure
  if structure is not None and dict(structure.widths) != widths_of(model):
    raise ValueError('the structure was derived for other widths than the model has.')
  copies = _Copies(inits=[variables], seeds=[seed], stages=[stage], group=stage, vmapped=False,
                   record=dict(record or {}))
  run = _prepare(model, options, arrays, spec, copies, structure, mesh, step_hook, callbacks)
  [trained] = _train(run, masks, hook_state)
  return trained


def fit_copies(model: nn.Module, variables: Sequence[Mapping], arrays: Mapping,
               spec: data.DataSpec, options: TrainOptions, *, stage_dirs: Sequence,
               seeds: Sequence[int], checkpoint_dir, mesh: Mesh | None = None,
               record: Mapping | None = None) -> list[tuple[dict, dict]]:
  """Trains K independent copies of `model` as one program, vmapped over the copies.

  Copy i is the run `fit(model, variables[i], ..., stage_dir=stage_dirs[i],
  seed=seeds[i])`: same initial variables, data order and augmentation, and its stage
  directory ends the same way (metrics.jsonl, tensorboard/, final/, result.json), so a
  later `fit` of that stage only loads it. Its numbers agree with the separate run up to
  float rounding (the vmapped step may sum in another order), not bit for bit. Every
  copy has the same widths and options; masks and step hooks are not supported.

  The group's training checkpoints live in checkpoint_dir/copies-<seeds> (resumable
  like `fit`'s). When every stage is done they are only loaded; a group stopped after
  some of its copies were written resumes, and the written ones are left as they are.
  A non-finite loss in any copy stops the group (errors.Diverged, naming the first
  such copy's stage; each such stage gets its diverged.json).

  Returns:
    [(variables, result)] per copy, as `fit` returns them.
  """
  stages = [checkpoint.stage_path(d) for d in stage_dirs]
  if not len(stages) == len(variables) == len(seeds):
    raise ValueError(f'fit_copies got {len(variables)} variables, {len(seeds)} seeds and '
                     f'{len(stages)} stage directories; it needs one of each per copy.')
  if all(checkpoint.is_done(stage) for stage in stages):
    finals = [checkpoint.load_final(stage, like=v) for stage, v in zip(stages, variables)]
    if all(final is not None for final in finals):
      logging.info('Stages %s are done; using their saved results.', [str(s) for s in stages])
      return [(final, checkpoint.read_result(stage)) for stage, final in zip(stages, finals)]
  for stage in stages:
    stage.mkdir(parents=True, exist_ok=True)
  # Named by every copy, so a group stopped between its copies' final writes resumes
  # from its last checkpoint and writes only what is missing.
  group = checkpoint.stage_path(checkpoint_dir) / ('copies-' + '-'.join(map(str, seeds)))
  copies = _Copies(inits=list(variables), seeds=list(seeds), stages=stages, group=group,
                   vmapped=True, record=dict(record or {}))
  run = _prepare(model, options, arrays, spec, copies, None, mesh, None, ())
  return _train(run, None, None)
