"""A stage directory's record on disk: orbax checkpoints, resume, preemption and the done marker.

Layout of one stage directory (a local path or `gs://...`, through `etils.epath`):

  checkpoints/<step>/   orbax checkpoints of the whole training run (latest 2 kept)
  corrupt_checkpoints/  checkpoints that did not restore, set aside (resume skips them)
  final/                the final model variables (params, batch_stats, indices), no optimizer
  metrics.jsonl         one JSON record per finished epoch
  tensorboard/          TensorBoard event files of the epochs' metrics (local stages only)
  diverged.json         written when the loss became non-finite; removed when the stage finishes
  result.json           written last: its presence marks the stage done

A done stage is never trained or written again; `fit` returns what it recorded.
"""

import contextlib
import itertools
import json
import signal
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from jaxprune import multihost
from jaxprune.errors import DataError

CHECKPOINTS = 'checkpoints'
CORRUPT = 'corrupt_checkpoints'
FINAL = 'final'
METRICS = 'metrics.jsonl'
RESULT = 'result.json'
DIVERGED = 'diverged.json'
TENSORBOARD = 'tensorboard'


@contextlib.contextmanager
def naming(path):
  """Re-raises an OSError that names no file (a failed write() or close() names none) as
  one that names `path`, so the one-line storage error says where."""
  try:
    yield
  except OSError as error:
    if error.filename is None and error.errno is not None:
      raise OSError(error.errno, error.strerror, str(path)) from error
    raise


def stage_path(stage_dir) -> epath.Path:
  return epath.Path(stage_dir)


def write_text(path: epath.Path, text: str) -> None:
  """Writes a small file from process 0 only, via a temporary name (never half-written)."""
  if jax.process_index() != 0:
    return
  with naming(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + '.tmp')
    tmp.write_text(text)
    tmp.replace(path)


def is_done(stage_dir) -> bool:
  """Whether the stage finished (its result.json exists). Every process of a multi-process
  run gets process 0's answer, so none skips a stage that another trains."""
  return multihost.agree(f'{stage_dir} done', (stage_path(stage_dir) / RESULT).exists)


def load_final(stage_dir, like):
  """The final variables of a done stage, or None (logged) if they do not restore; then the
  stage is no longer done (its result.json is removed, to be rewritten from its last
  checkpoint by the training loop, which resumes at the end)."""
  stage = stage_path(stage_dir)
  try:
    return load_variables(stage / FINAL, like=like)
  except DataError as error:
    logging.warning('%s Rebuilding %s from the last checkpoint.', error, stage / FINAL)
    if jax.process_index() == 0:
      (stage / RESULT).unlink()
    return None


def read_result(stage_dir) -> dict:
  return json.loads((stage_path(stage_dir) / RESULT).read_text())


def mark_done(stage_dir, result: Mapping[str, Any]) -> None:
  """Writes result.json, the marker that the stage is finished; refuses to overwrite one."""
  path = stage_path(stage_dir) / RESULT
  if jax.process_index() == 0 and path.exists():
    raise FileExistsError(f"stage {stage_dir} is already done; its {RESULT} is never overwritten.")
  write_text(path, json.dumps(dict(result), indent=2, sort_keys=True) + '\n')


def mark_diverged(stage_dir, epoch: int, step: int, resume_step: int,
                  learning_rate: float) -> None:
  """Writes diverged.json: the stage's loss became non-finite at `step` of `epoch` (1-based).

  `resume_step` is the step of the checkpoint a rerun resumes from (0: none, it starts
  over) and `learning_rate` the configured (peak) learning rate that diverged.
  """
  record = {'epoch': epoch, 'step': step, 'resume_step': resume_step,
            'learning_rate': learning_rate}
  write_text(stage_path(stage_dir) / DIVERGED, json.dumps(record, indent=2, sort_keys=True) + '\n')


def read_diverged(stage_dir) -> dict | None:
  """diverged.json's record, or None if the stage has not diverged since it last finished."""
  path = stage_path(stage_dir) / DIVERGED
  return json.loads(path.read_text()) if path.exists() else None


def clear_diverged(stage_dir) -> None:
  """Removes diverged.json (the stage has since finished)."""
  path = stage_path(stage_dir) / DIVERGED
  if jax.process_index() == 0 and path.exists():
    path.unlink()


def write_metrics(stage_dir, records) -> None:
  """Rewrites metrics.jsonl with all records (rewriting, not appending, works on object stores)."""
  write_text(stage_path(stage_dir) / METRICS,
              ''.join(json.dumps(r, sort_keys=True) + '\n' for r in records))


def read_metrics(stage_dir) -> list[dict]:
  path = stage_path(stage_dir) / METRICS
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _savable(tree):
  """`tree` as orbax saves it from every process: arrays of one process's devices (`init`'s,
  the same on every process) become host arrays, which orbax writes once, from process 0."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(
      lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x, tree)


def save_variables(path, variables) -> None:
  """Saves model variables (a nested dict of arrays) to `path`, replacing what is there.

  Every process of a multi-process run calls it (orbax saves collectively)."""
  checkpointer = ocp.StandardCheckpointer()
  # close() too: it waits for metadata writes still in flight, whose failure names no file.
  with naming(path):
    try:
      checkpointer.save(epath.Path(path), _savable(variables), force=True)
      checkpointer.wait_until_finished()
    finally:
      checkpointer.close()


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'.rstrip(': ')


def load_variables(path, like=None):
  """Loads variables saved by `save_variables`.

  `like` (arrays or jax.ShapeDtypeStruct with shardings) fixes the structure, dtypes and
  placement; without it the saved structure is restored onto the default device.

  Raises:
    DataError: the saved variables do not restore (a damaged or missing file), naming the
      directory and the first line of the failure.
  """
  checkpointer = ocp.StandardCheckpointer()
  target = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  try:
    variables = checkpointer.restore(epath.Path(path), target)
  except Exception as error:  # pylint: disable=broad-except
    # Orbax and tensorstore raise many types for a damaged file; all mean "unreadable".
    raise DataError(f'the variables in {path} do not restore ({_first_line(error)}).') from error
  finally:
    checkpointer.close()
  return variables


class RunCheckpoints:
  """The training checkpoints of one stage: a pytree of arrays plus a JSON log, per step.

  Saving is asynchronous (orbax copies device arrays to host, then writes in the
  background), so an epoch's checkpoint overlaps the next epoch's training.
  """

  def __init__(self, stage_dir, max_to_keep: int = 2):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._directory = stage_path(stage_dir) / CHECKPOINTS
    self._manager = ocp.CheckpointManager(self._directory, options=options,
                                          item_names=('state', 'log'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree, log: Mapping[str, Any]) -> None:
    """Starts saving `tree` (arrays) and `log` (JSON-able) as checkpoint `step`."""
    with naming(self._directory / str(step)):
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree), log=ocp.args.JsonSave(dict(log))), force=True)

  def restore_latest(self, like):
    """Returns (tree, log) of the newest checkpoint that restores, or None if there is none.

    `like` is a pytree with the saved structure (arrays or ShapeDtypeStructs); restored
    arrays take its dtypes and shardings. A checkpoint that does not restore (a truncated
    or corrupted file) is logged, moved to CORRUPT/<step> and skipped for the next newest;
    when none restores, a DataError names the stage and the first failure.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), log=ocp.args.JsonRestore()))
      except Exception as error:  # pylint: disable=broad-except
        # Orbax and tensorstore raise many types for a damaged file; all mean "unreadable".
        reason = _first_line(error)
        logging.warning('Checkpoint %s of %s does not restore (%s); skipping it.', step,
                        self._directory, reason)
        failures.append((step, reason))
        self._set_aside(step)
        continue
      if failures:
        logging.warning('Resuming %s from checkpoint %d instead of the damaged %s.',
                        self._directory, step, ', '.join(str(s) for s, _ in failures))
      return restored.state, restored.log
    if failures:
      step, reason = failures[0]
      raise DataError(f'no checkpoint of stage {self._directory.parent} restores: '
                      f'{self._directory / str(step)} fails with {reason!r}; they are set aside '
                      f'in {self._directory.parent / CORRUPT}, and a rerun trains the stage '
                      'again.')
    return None

  def _set_aside(self, step: int) -> None:
    # Out of the manager's directory, so that training can save this step again.
    if jax.process_index() == 0:
      aside = self._directory.parent / CORRUPT
      aside.mkdir(parents=True, exist_ok=True)
      target = aside / str(step)
      if target.exists():
        target = aside / f'{step}.{int(time.time())}'
      (self._directory / str(step)).rename(target)
    self._manager.reload()

  def wait(self) -> None:
    with naming(self._directory):
      self._manager.wait_until_finished()

  def close(self) -> None:
    with naming(self._directory):
      self._manager.close()


# Preemption checks made by this process, over all stages (`PreemptionGuard`).
_SYNC_CHECKS = itertools.count(1)


class PreemptionGuard:
  """Notices preemption (SIGTERM) and Ctrl-C (SIGINT) between training steps, without any
  device synchronisation.

  Single process: a signal handler sets a flag that `reached(step)` reads (a Python
  bool, so checking it every step costs nothing). A second Ctrl-C is not caught: it
  interrupts at once, as a user pressing it twice means.

  Several processes must all stop at the same step, so there orbax's `reached_preemption`
  (JAX's preemption sync point) decides, and JAX's own handler receives the SIGTERM: a
  SIGTERM to any one process is passed to all through the coordination service, which
  picks the first check that every process has not yet passed, and there all save and stop.
  That protocol needs check numbers that only grow, the same on every process; a stage's
  step restarts at 0 (and a resumed one at its checkpoint), so the checks are counted over
  the whole process instead (`_SYNC_CHECKS`), every process making the same ones. A SIGTERM
  after a stage's last check stops the run at the next stage's first; after the run's last,
  the run simply finishes. Ctrl-C is not caught there (KeyboardInterrupt, status 130).

  Use as a context manager around the training loop; the previous handlers are restored on
  exit.
  """

  def __init__(self):
    self._flag = False
    self.interrupted = False
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      self.interrupted = True
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
      logging.warning('Ctrl-C: saving at the next step, then exiting (Ctrl-C again to stop '
                      'at once, losing the steps since the last checkpoint).')
    else:
      logging.warning('SIGTERM received: saving at the next step, then exiting.')
    self._flag = True

  def __enter__(self):
    # Signal handlers can only be installed from the main thread; elsewhere only
    # the multi-process sync point can report preemption.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handler)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
    return False

  @property
  def signalled(self) -> bool:
    """Whether this process received SIGTERM or Ctrl-C while the guard was up."""
    return self._flag

  def reached(self, step: int) -> bool:
    """Whether to save and stop now at `step`; every process makes the same calls."""
    del step  # Only the order of the calls matters (class docstring).
    if jax.process_count() > 1:
      return ocp.multihost.reached_preemption(next(_SYNC_CHECKS))
    return self._flag
