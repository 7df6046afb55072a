"""`fit`: the resumable training loop of every stage.

One loop over the training steps, in calls of `steps_per_call` steps (each a compiled
`lax.fori_loop` that makes its batches on the device), with periodic actions on the host:
every call, the progress bar and the preemption check (after a SIGTERM or Ctrl-C noted by an
entry point's handlers, `checkpoint.SIGNALS`: save this step and stop); every epoch's end,
the health check, the test-set evaluation, the log line with its ETA, metrics.jsonl,
TensorBoard (tensorboardX), the checkpoint and the callbacks. A `stream.Stream` steps one
host batch at a time; its iterator's position is saved beside the state. The latest
checkpoint is restored first, so a crash or preemption loses at most the steps since then.
`fit_copies` runs the same loop over K runs stacked along a leading axis (one vmapped
program). What a stage directory means (done, result.json, diverged.json) is the pipeline's.

Health: a run diverges when a training step's loss is not finite or above
`LOSS_LIMIT_FACTOR` x ln(classes) (uniform guessing scores ln(classes)), when its parameters
or BN statistics stop being finite, or when an epoch's test loss is not finite (no upper
limit there: early on, BN's running statistics lag the weights). It raises `errors.Diverged`
and saves nothing of that epoch, so the latest checkpoint is healthy and a rerun with a
smaller learning rate resumes from it.
"""

import dataclasses
import functools
import itertools
import math
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
from jax.sharding import Mesh

from jaxprune import data, stream
from jaxprune.errors import Diverged
from jaxprune.models import widths_of
from jaxprune.prune import program
from jaxprune.prune import structure as structure_lib
from jaxprune.train import checkpoint
from jaxprune.train.optim import OptimizerConfig, learning_rates
from jaxprune.train.step import (TEST_SET, TRAIN_SET, Masks, TrainState, accumulate_metrics,
                                 all_finite, check_divisible, compute_dtype, epoch_programs,
                                 evaluate, make_mesh, on_mesh, train_calls, trainer_for)

StepHook = Callable[[TrainState, Mapping, Masks, Any], tuple[Masks, Any]]
EpochCallback = Callable[[TrainState, dict], None]
LOSS_LIMIT_FACTOR = 10.0
# A streamed run's checkpoint log entry: the input iterator's position (`stream`).
INPUT_STATE = 'input_state'


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  """How a stage trains, apart from the model, its data and where it writes.

  Attributes:
    batch_size: the global training batch (over all devices); an epoch drops its last partial one.
    optimizer: the `OptimizerConfig`; its schedule is evaluated once for every step.
    precision: the compute dtype of training and evaluation, one of PRECISIONS.
    eval_batch_size: the test batch (default: batch_size).
    max_to_keep: epoch checkpoints kept.
    steps_per_call: training steps per compiled call (never across an epoch's end); every
      value above 1, and a resume at any step, gives the same bits; 1 agrees up to float
      rounding. Signals are honoured between calls. A `step_hook` forces 1. None:
      `default_steps_per_call` of the backend.
  """
  epochs: int
  batch_size: int
  optimizer: OptimizerConfig = OptimizerConfig()
  precision: str = 'float32'
  eval_batch_size: int | None = None
  max_to_keep: int = 2
  steps_per_call: int | None = None

  def __post_init__(self):
    # The settings are validated where a user gives them; this guards code that builds one.
    for name in ('epochs', 'batch_size', 'eval_batch_size', 'max_to_keep', 'steps_per_call'):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f'TrainOptions.{name} must be at least 1, got {value}.')
    compute_dtype(self.precision)

  @property
  def test_batch_size(self) -> int:
    return self.eval_batch_size or self.batch_size


def default_steps_per_call(backend: str) -> int:
  """`TrainOptions.steps_per_call` when none is given: the device does not wait on the host
  between steps, and a SIGTERM is honoured well inside a preemption's notice."""
  return 10 if backend == 'cpu' else 50


def loss_limit(num_classes: int) -> float:
  """The loss above which a run has diverged (module docstring)."""
  return LOSS_LIMIT_FACTOR * math.log(max(num_classes, 2))


_WRITERS_OPENED = itertools.count()
_BOARD_TAGS = (('train/loss', 'train_loss'), ('train/accuracy', 'train_accuracy'),
               ('test/loss', 'test_loss'), ('test/accuracy', 'test_accuracy'),
               ('learning_rate', 'learning_rate'))


def _open_boards(directories: Sequence[epath.Path], resumed_step: int) -> list:
  """A TensorBoard writer per directory (process 0; else None), local or gs:// (the `gcs`
  extra); a resumed run purges its earlier attempts' events after the step it resumes from."""
  if jax.process_index() != 0:
    return [None] * len(directories)
  # tensorboardX names a file by the second it opened it; an attempt resumed within that
  # second would overwrite the earlier attempt's file without a suffix of its own.
  return [tensorboardX.SummaryWriter(
      logdir=str(d / checkpoint.TENSORBOARD), purge_step=resumed_step + 1 if resumed_step else None,
      filename_suffix=f'.{os.getpid()}.{next(_WRITERS_OPENED)}') for d in directories]


def _progress_bar(total: int, initial: int):
  if jax.process_index() != 0 or not sys.stderr.isatty():
    return None
  import tqdm  # Installed with tensorflow-datasets; only needed on a terminal.
  return tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True)


def format_duration(seconds: float) -> str:
  """'1h02m03s', or '2m03s' under an hour: how progress lines give an ETA."""
  minutes, s = divmod(int(round(seconds)), 60)
  hours, m = divmod(minutes, 60)
  return f'{hours}h{m:02d}m{s:02d}s' if hours else f'{m}m{s:02d}s'


def _summary(history: Sequence[dict], options: TrainOptions, steps: int, seed: int) -> dict:
  """What a finished run reports: its last epoch's numbers and the best epoch's test
  accuracy ([R]'s code reports the best, the final one is ours), its length and time."""
  final = history[-1]
  best = max(history, key=lambda r: r['test_accuracy'])
  return {'test_accuracy': final['test_accuracy'], 'test_loss': final['test_loss'],
          'best_test_accuracy': best['test_accuracy'], 'best_epoch': best['epoch'],
          'train_accuracy': final['train_accuracy'], 'train_loss': final['train_loss'],
          'epochs': options.epochs, 'steps': steps, 'batch_size': options.batch_size,
          'seed': seed, 'wall_time_s': final['elapsed_s']}


def _fit(model, inits, seeds, arrays, spec, options: TrainOptions, *, checkpoint_dir,
         metric_dirs, copies: bool, masks=None, structure=None, step_hook=None, hook_state=None,
         callbacks=(), mesh=None) -> list[tuple[dict, dict]]:
  """The loop of `fit` and `fit_copies` (`copies`: K stacked runs): per run (variables, summary)."""
  mesh = mesh if mesh is not None else make_mesh()
  check_divisible('batch_size', options.batch_size, mesh)
  check_divisible('eval_batch_size', options.test_batch_size, mesh)
  streamed = isinstance(arrays, stream.Stream)
  if streamed and copies:
    raise ValueError('a stream feeds one run; train seed copies one by one.')
  per_epoch = data.steps_per_epoch(
      arrays.num_train if streamed else int(arrays['train_labels'].shape[0]), options.batch_size)
  total = options.epochs * per_epoch
  rates = learning_rates(options.optimizer, options.epochs, per_epoch)
  trainer = trainer_for(model, options.optimizer, structure, mesh, options.precision, copies)
  if streamed:
    test_set, image_shape = arrays, arrays.image_shape
    batches = stream.train_iterator(arrays, seed=seeds[0], batch_size=options.batch_size,
                                    epochs=options.epochs)
    make_batch = lambda *_: stream.to_device(next(batches), trainer.batch_sharding, spec)
    permutation = lambda *_: None
  else:
    train_set = on_mesh(arrays, TRAIN_SET, trainer.replicated)
    test_set = on_mesh(arrays, TEST_SET, trainer.replicated)
    image_shape = arrays['train_images'].shape[1:]
    permutation, make_batch = epoch_programs(trainer, train_set, spec, options.batch_size)
  # Host batches come one per step; a per-step hook looks at every step.
  per_call = (1 if step_hook is not None or streamed else
              options.steps_per_call or default_steps_per_call(jax.default_backend()))
  calls = train_calls(trainer, spec) if per_call > 1 else None
  classes = jax.eval_shape(functools.partial(model.apply, train=False), inits[0],
                           jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)).shape[-1]
  limit = np.float32(loss_limit(classes))
  count = len(metric_dirs)
  zeros = lambda dtype: trainer.replicate(np.zeros((count,) if copies else (), dtype))
  new_sums = lambda: {'loss': zeros(np.float32), 'accuracy': zeros(np.float32)}
  bad = {'step': zeros(np.int32), 'loss': zeros(np.float32)}
  state = trainer.init_state(inits, seeds) if copies else trainer.init_state(inits[0], seeds[0])
  carry = {'train': state, 'masks': trainer.replicate(masks), 'hook': trainer.replicate(hook_state),
           'sums': new_sums()}
  log = {'records': [[] for _ in metric_dirs], 'elapsed_s': 0.0}
  checkpoints = checkpoint.RunCheckpoints(checkpoint_dir, options.max_to_keep)
  boards, bar = [], None
  with checkpoint.SIGNALS.deferred():
    try:
      restored = checkpoints.restore_latest(carry)
      if restored is not None:
        carry, log = restored
        logging.info('Resuming %s from step %d.', checkpoint_dir, checkpoints.latest_step())
        if streamed:
          batches.set_state(log[INPUT_STATE])
      state, masks, hook_state, sums = (carry[k] for k in ('train', 'masks', 'hook', 'sums'))
      # A single run's records may be one flat list (checkpoints written by earlier versions).
      histories = [list(r) for r in (log['records'] if log['records'] and isinstance(
          log['records'][0], list) else [log['records']])]
      step = int(np.reshape(jax.device_get(state.step), -1)[0])
      started, elapsed_before = time.time(), float(log['elapsed_s'])
      elapsed = lambda: elapsed_before + time.time() - started

      def save():
        checkpoints.save(step, {'train': state, 'masks': masks, 'hook': hook_state, 'sums': sums},
                         {'records': histories, 'elapsed_s': elapsed(),
                          **({INPUT_STATE: batches.get_state()} if streamed else {})})

      def fetch():  # The host's one wait for the device in an epoch.
        return jax.device_get({'bad': bad, 'sums': sums, 'finite': all_finite(
            (state.params, state.batch_stats), copies)})

      def check_health(fetched, test_loss=None):
        """Raises Diverged naming the first unhealthy run (module docstring)."""
        above = f'above {limit:.3g} ({LOSS_LIMIT_FACTOR:g} x ln of the {classes} classes)'
        for i in range(count):
          bad_step, bad_loss = (np.reshape(fetched['bad'][k], -1)[i] for k in ('step', 'loss'))
          if bad_step:
            at, reason = int(bad_step), f'the training loss is {bad_loss:.3g}' + (
                f', {above}' if np.isfinite(bad_loss) else '')
          elif not fetched['finite'][i]:
            at, reason = step, 'the parameters or BN statistics are not finite'
          elif test_loss is not None and not np.isfinite(np.reshape(test_loss, -1)[i]):
            at, reason = step, f'the test loss is {np.reshape(test_loss, -1)[i]:.3g}'
          else:
            continue
          checkpoints.wait()
          raise Diverged(stage=str(metric_dirs[i]), epoch=(at - 1) // per_epoch + 1, step=at,
                         resume_step=checkpoints.latest_step() or 0, reason=reason)

      if step < total:
        boards, bar = _open_boards(metric_dirs, step), _progress_bar(total, step)
      order, lap = None, None
      while step < total:
        epoch = step // per_epoch
        epoch_end = (epoch + 1) * per_epoch
        if order is None or step == epoch_end - per_epoch:
          order = permutation(state.rng, epoch)
          epoch_rates = (None if calls is None else
                         jax.device_put(rates[epoch_end - per_epoch:epoch_end], trainer.replicated))
          epoch_started, epoch_first = time.time(), step
        stop = min(step + per_call, epoch_end)
        if calls is not None:
          state, sums, bad = calls(state, sums, bad, masks, train_set['train_images'],
                                   train_set['train_labels'], order, epoch_rates, limit,
                                   np.int32(step), np.int32(stop))
        else:
          batch = make_batch(order, state.rng, step)
          state, metrics = trainer.train_step(state, batch, masks, rates[step])
          sums, bad = accumulate_metrics(sums, bad, metrics, state.step, limit)
          if step_hook is not None:
            masks, hook_state = step_hook(state, batch, masks, hook_state)
        if bar is not None:
          bar.update(stop - step)
        step = stop
        lap = lap or (time.time(), step)  # The ETA's clock starts after the compiling call.

        if step == epoch_end:
          fetched = fetch()
          train_seconds = time.time() - epoch_started
          check_health(fetched)
          test = evaluate(trainer.evaluator, state.variables, test_set, spec, masks,
                           options.test_batch_size)
          check_health(fetched, test['loss'])
          values = {'train_loss': fetched['sums']['loss'] / per_epoch,
                    'train_accuracy': fetched['sums']['accuracy'] / per_epoch,
                    'test_loss': test['loss'], 'test_accuracy': test['accuracy']}
          images_per_second = (step - epoch_first) * options.batch_size / train_seconds
          for i, history in enumerate(histories):
            history.append({'epoch': epoch + 1, 'step': step,
                            **{k: float(np.reshape(v, -1)[i]) for k, v in values.items()},
                            'learning_rate': float(rates[step - 1]),
                            'images_per_second': images_per_second, 'elapsed_s': elapsed()})
          sums = new_sums()
          save()
          for directory, history, writer in zip(metric_dirs, histories, boards):
            checkpoint.write_metrics(directory, history)
            if writer is not None:
              with checkpoint.naming(directory / checkpoint.TENSORBOARD):
                for tag, name in _BOARD_TAGS:
                  writer.add_scalar(tag, history[-1][name], global_step=step)
          per_step = (time.time() - lap[0]) / (step - lap[1]) if step > lap[1] else None
          mean = lambda name: float(np.mean(values[name]))
          logging.info(
              'epoch %d/%d  loss %.4f  acc %.4f  test loss %.4f  test acc %s  lr %.3g  %.0f img/s'
              '%s  eta %s', epoch + 1, options.epochs, mean('train_loss'),
              mean('train_accuracy'), mean('test_loss'),
              ' '.join(f'{a:.4f}' for a in np.reshape(values['test_accuracy'], -1)),
              rates[step - 1], images_per_second * count,
              f' ({count} copies; losses are means)' if copies else '',
              '?' if per_step is None else format_duration((total - step) * per_step))
          for callback in callbacks:
            callback(state, histories[0][-1])
        elif calls is not None:
          # The signal is looked at once the call has run, so the host never queues more than
          # one call ahead of the device: that bounds how late a SIGTERM is honoured.
          jax.block_until_ready(bad)

        if step < total and checkpoint.SIGNALS.reached():
          if step != epoch_end:
            check_health(fetch())  # A diverged state is never saved.
            save()
          checkpoints.wait()
          logging.warning('Preempted: saved step %d of %d in %s.', step, total, checkpoint_dir)
          raise checkpoint.SIGNALS.stop(step, str(checkpoint_dir))
      checkpoints.wait()
    finally:
      if bar is not None:
        bar.close()
      for directory, writer in zip(metric_dirs, boards):
        if writer is not None:
          with checkpoint.naming(directory / checkpoint.TENSORBOARD):
            writer.close()
      checkpoints.close()
      if streamed:
        batches.close()
  variables = [trainer.variables_of(state, i) for i in range(count)]
  return [(v, _summary(h, options, total, seed)) for v, h, seed in zip(variables, histories, seeds)]


def fit(model: nn.Module, variables: Mapping, arrays: Mapping, spec: data.DataSpec,
        options: TrainOptions, *, stage_dir, seed: int = 0, masks: Masks = None,
        structure: structure_lib.Structure | None = None, step_hook: StepHook | None = None,
        hook_state: Any = None, callbacks: Sequence[EpochCallback] = (),
        mesh: Mesh | None = None) -> tuple[dict, dict]:
  """Trains the Flax `model` from `variables`, resuming from stage_dir's latest checkpoint.

  Args:
    arrays: the dataset (`data.device_put_dataset(ds)`, or arrays it places) or a `stream.Stream`.
    spec: `ds.spec`, the augmentation and normalisation of `data.train_batch`.
    stage_dir: directory (local or gs://) of the checkpoints, metrics.jsonl and tensorboard/.
    seed: the run's seed; permutations and augmentations derive from (seed, epoch, step).
    masks: {group: (C,)} masks applied throughout; removed channels' parameters stay fixed.
      Give all-ones masks for every group a `step_hook` may prune later.
    structure: the model's structure (derived when masks are given and it is not).
    step_hook: `hook(state, batch, masks, hook_state) -> (masks, hook_state)` after every
      step; new mask values (same shapes) apply from the next step without recompiling.
      Both are checkpointed, so a hook whose state is a pytree of arrays resumes exactly.
    hook_state: the hook's initial state (a pytree of arrays, or None).
    callbacks: called after every epoch (its checkpoint started) with the state and record.
    mesh: devices to train on (default: all, `make_mesh()`).

  Returns:
    (variables, summary): the final variables and `_summary`'s numbers. A run whose
    checkpoint is its last step trains nothing and returns what that checkpoint holds.

  Raises:
    errors.Preempted: after saving on a SIGTERM (errors.Interrupted: Ctrl-C) that the
      handlers of an entry point noted (`checkpoint.SIGNALS.installed`); fit installs none.
    errors.Diverged: the run broke the health rule (module docstring); its latest
      checkpoint is healthy, and a rerun (e.g. with a smaller learning rate) resumes from it.
  """
  stage = epath.Path(stage_dir)
  if masks:
    # One dtype, so that masks a hook returns do not trigger a recompilation.
    masks = {g: np.asarray(m, np.float32) for g, m in masks.items()}
    if structure is None:
      structure = program.derive(model, tuple(arrays['train_images'].shape[1:])).structure
  if structure is not None and dict(structure.widths) != widths_of(model):
    raise ValueError('the structure was derived for other widths than the model has.')
  return _fit(model, [variables], [seed], arrays, spec, options, checkpoint_dir=stage,
              metric_dirs=[stage], copies=False, masks=masks, structure=structure,
              step_hook=step_hook, hook_state=hook_state, callbacks=callbacks, mesh=mesh)[0]


def fit_copies(model: nn.Module, variables: Sequence[Mapping], arrays: Mapping, spec: data.DataSpec,
               options: TrainOptions, *, stage_dirs: Sequence, seeds: Sequence[int],
               checkpoint_dir, mesh: Mesh | None = None) -> list[tuple[dict, dict]]:
  """Trains K independent copies of `model` as one program, vmapped over the copies.

  Returns [(variables, summary)] per copy: copy i's as `fit(model, variables[i], ...,
  stage_dir=stage_dirs[i], seed=seeds[i])` returns them (metrics.jsonl and tensorboard/ in
  stage_dirs[i]), up to float rounding (the vmapped step may sum in another order). Every
  copy has the same widths and options, no masks or step hooks. The group's checkpoints live
  in checkpoint_dir/copies-<seeds>; errors.Diverged names the first copy that diverged.
  """
  stages = [epath.Path(d) for d in stage_dirs]
  if not len(stages) == len(variables) == len(seeds):
    raise ValueError(f'fit_copies got {len(variables)} variables, {len(seeds)} seeds and '
                     f'{len(stages)} stage directories; it needs one of each per copy.')
  group = epath.Path(checkpoint_dir) / ('copies-' + '-'.join(map(str, seeds)))
  return _fit(model, list(variables), list(seeds), arrays, spec, options, checkpoint_dir=group,
              metric_dirs=stages, copies=True, mesh=mesh)
