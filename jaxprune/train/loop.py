"""`fit`: the resumable training loop every stage uses (one run, or K vmapped copies).

`fit` shuffles and augments on device, checkpoints every epoch (resuming after a crash or
preemption) and leaves metrics.jsonl and result.json in the stage directory.
`fit_copies` trains K runs of equal widths (e.g. K seeds) as one vmapped program
through the same loop, leaving each run's stage directory as its own `fit` would.
"""

import functools
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding

from jaxprune import data
from jaxprune.errors import ConfigError
from jaxprune.models import widths_of
from jaxprune.prune import structure as structure_lib
from jaxprune.train import checkpoint
from jaxprune.train.optim import OptimizerConfig, learning_rates
from jaxprune.train.step import Masks, Trainer, TrainState, epoch_keys, make_mesh, trainer_for

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

