"""A stage directory's record on disk: orbax checkpoints, resume, preemption and the done marker.

Layout of one stage directory (a local path or `gs://...`, through `etils.epath`):

  checkpoints/<step>/   orbax checkpoints of the whole training run (latest 2 kept)
  corrupt_checkpoints/  checkpoints that did not restore, set aside (resume skips them)
  final/                the final model variables (no optimizer state) and checksums.json
  metrics.jsonl         one JSON record per finished epoch
  tensorboard/          TensorBoard event files of the epochs' metrics
  diverged.json         written when training diverged; removed once the stage finishes
  result.json           written last: its presence marks the stage done

The pipeline writes final/, result.json and diverged.json (`pipeline.stages.train_stage`); a
done stage is never trained or written again.
"""

import contextlib
import gc
import inspect
import itertools
import json
import signal
import sys
import threading
import time
import warnings
import zlib
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from jaxprune import multihost, storage
from jaxprune.errors import ConfigError, DataError, Interrupted, Preempted

CHECKPOINTS = 'checkpoints'
CORRUPT = 'corrupt_checkpoints'
FINAL = 'final'
METRICS = 'metrics.jsonl'
RESULT = 'result.json'
DIVERGED = 'diverged.json'
TENSORBOARD = 'tensorboard'
# Beside orbax's files of a `save_variables` directory: a CRC-32 of every array. Orbax
# restores compressed data with flipped bytes without complaint, as other numbers.
CHECKSUMS = 'checksums.json'
# The same checksums inside a training checkpoint's JSON log.
_LOG_CHECKSUMS = 'checksums'


@contextlib.contextmanager
def naming(path):
  """Re-raises an OSError naming no file (a failed write() or close()) as one naming `path`."""
  try:
    yield
  except OSError as error:
    if error.filename is None and error.errno is not None:
      raise OSError(error.errno, error.strerror, str(path)) from error
    raise


def write_text(path: epath.Path, text: str) -> None:
  """Writes a small file from process 0 only, never half-written: on a disk via a temporary
  name; an object store (gs://) makes an object visible only once it is whole."""
  if jax.process_index() != 0:
    return
  with naming(path):
    if '://' in str(path):
      path.write_text(text)
      return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + '.tmp')
    tmp.write_text(text)
    tmp.replace(path)


def is_done(stage_dir) -> bool:
  """Whether the stage finished (its result.json exists). Every process of a multi-process
  run gets process 0's answer, so none skips a stage that another trains."""
  return multihost.agree(f'{stage_dir} done', (epath.Path(stage_dir) / RESULT).exists)


def load_final(stage_dir, like):
  """The final variables of a done stage, or None (logged) if they or its result.json are
  damaged: then result.json is removed, and training the stage resumes from its last
  checkpoint, at its end, to write both again. ConfigError (nothing removed): final/ holds
  variables of another structure than `like`."""
  stage = epath.Path(stage_dir)
  try:
    read_json(stage / RESULT)
    return load_variables(stage / FINAL, like=like)
  except DataError as error:
    logging.warning('%s Rebuilding %s and %s from the last checkpoint.', error, stage / FINAL,
                    RESULT)
    if jax.process_index() == 0:
      (stage / RESULT).unlink(missing_ok=True)
    return None


def read_json(path: epath.Path, advice: str = '', settings=()) -> dict:
  """The JSON object in the file `path`; a DataError if it is damaged (not UTF-8 JSON, or no
  object), naming it, the damage and `advice` (what to do, if given; naming `settings`)."""
  try:
    value = json.loads(path.read_text())
  except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
    reason = _first_line(error)
  else:
    if isinstance(value, dict):
      return value
    reason = f'it holds a JSON {type(value).__name__}, not an object'
  raise DataError(f'{path} is damaged ({reason})' + (f'; {advice}' if advice else '.'),
                  settings=settings)


def read_result(stage_dir) -> dict:
  """The stage's result.json (DataError if it is damaged)."""
  return read_json(epath.Path(stage_dir) / RESULT,
                   'a run of the stage rebuilds it from its last checkpoint.')


def mark_done(stage_dir, result: Mapping[str, Any]) -> None:
  """Writes result.json, the marker that the stage is finished; refuses to overwrite one."""
  path = epath.Path(stage_dir) / RESULT
  if jax.process_index() == 0 and path.exists():
    raise FileExistsError(f"stage {stage_dir} is already done; its {RESULT} is never overwritten.")
  write_text(path, json.dumps(dict(result), indent=2, sort_keys=True) + '\n')


def mark_diverged(stage_dir, epoch: int, step: int, resume_step: int, learning_rate: float) -> None:
  """Writes diverged.json: the stage's training diverged at `step` of `epoch` (1-based) with
  the configured (peak) `learning_rate`; a rerun resumes from checkpoint `resume_step` (0:
  none, it starts over)."""
  record = dict(epoch=epoch, step=step, resume_step=resume_step, learning_rate=learning_rate)
  write_text(epath.Path(stage_dir) / DIVERGED, json.dumps(record, indent=2, sort_keys=True) + '\n')


def read_diverged(stage_dir) -> dict | None:
  """diverged.json's record, or None if the stage has not diverged since it last finished."""
  path = epath.Path(stage_dir) / DIVERGED
  return json.loads(path.read_text()) if path.exists() else None


def clear_diverged(stage_dir) -> None:
  """Removes diverged.json (the stage has since finished)."""
  if jax.process_index() == 0:
    (epath.Path(stage_dir) / DIVERGED).unlink(missing_ok=True)


def write_metrics(stage_dir, records) -> None:
  """Rewrites metrics.jsonl with all records (rewriting, not appending, works on object stores)."""
  write_text(epath.Path(stage_dir) / METRICS,
              ''.join(json.dumps(r, sort_keys=True) + '\n' for r in records))


def read_metrics(stage_dir) -> list[dict]:
  """metrics.jsonl's records (DataError if it is damaged)."""
  path = epath.Path(stage_dir) / METRICS
  if not path.exists():
    return []
  try:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  except ValueError as error:
    raise DataError(f'{path} is damaged ({_first_line(error)}); delete it and rerun: training '
                    'rewrites it from the checkpoints, and a finished stage reports without '
                    'it.') from None


def _savable(tree):
  """`tree` as orbax saves it from every process: arrays of one process's devices (`init`'s,
  the same on every process) become host arrays, which orbax writes once, from process 0."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(
      lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x, tree)


def save_variables(path, variables) -> None:
  """Saves model variables (a nested dict of arrays) and their checksums to `path`, replacing
  what is there; every process of a multi-process run calls it (orbax saves collectively)."""
  # close() too: it waits for metadata writes still in flight, whose failure names no file.
  with naming(path), contextlib.closing(ocp.StandardCheckpointer()) as checkpointer:
    checkpointer.save(epath.Path(path), _savable(variables), force=True)
    checkpointer.wait_until_finished()
  write_text(epath.Path(path) / CHECKSUMS, json.dumps(checksums(variables)))


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'.rstrip(': ')


def _leaves_by_name(tree) -> dict[str, Any]:
  """{'params/conv1/kernel': leaf} whatever the keys' kinds (orbax's metadata has dict keys
  where the restored tree has a dataclass's attributes)."""
  def name(key):
    return next((getattr(key, attr) for attr in ('key', 'name', 'idx') if hasattr(key, attr)), key)

  return {'/'.join(str(name(key)) for key in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _crc32(leaf) -> int | None:
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if not leaf.is_fully_replicated:
      return None
    leaf = leaf.addressable_data(0)
  return zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).reshape(-1).view(np.uint8))


def checksums(tree) -> dict[str, int | None]:
  """{leaf name: CRC-32 of its bytes} of `tree`'s arrays (None: split over several processes)."""
  return {name: _crc32(leaf) for name, leaf in _leaves_by_name(tree).items()}


def _checksum_failure(restored, expected: Mapping[str, int | None] | None) -> str | None:
  """Why `restored` is not what was saved, by the checksums `expected` (None: unchecked)."""
  if expected is None:
    return None
  actual = checksums(restored)
  for name, saved in expected.items():
    if saved is not None and actual.get(name) not in (None, saved):
      return f'the checksum of {name} differs from when it was saved'
  return None


# A failed orbax read leaves coroutines behind that report themselves when collected, even at
# exit (a RuntimeWarning, or a traceback printing tensorstore's whole spec), and tensorstore
# callbacks into orbax's closed event loop ('Event loop is closed'): hundreds of lines about a
# failure already said in one sentence, dropped once a read has failed in this process.
_reads_failed = False


def _drop_leftovers_of_failed_reads() -> None:
  """Wraps the current sys.unraisablehook to drop those reports after a failed read."""
  current = sys.unraisablehook
  if getattr(current, 'drops_leftovers_of_failed_reads', False):
    return

  def hook(unraisable):
    reported, error = unraisable.object, unraisable.exc_value
    if inspect.iscoroutine(reported):
      dropped = '/orbax/' in reported.cr_code.co_filename
    else:
      dropped = isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'
    if not (_reads_failed and dropped):
      current(unraisable)

  hook.drops_leftovers_of_failed_reads = True
  sys.unraisablehook = hook


# Now, so that the hook an entry point restores after its run (the one at exit) drops them
# too; again after a failure, over a hook an entry point has installed meanwhile.
_drop_leftovers_of_failed_reads()


def _attempt(read: Callable[[], Any]) -> tuple[Any, str | None]:
  """(read(), None), or (None, the first line of its failure). Orbax and tensorstore raise
  many types for a damaged or missing file; all mean "unreadable"."""
  global _reads_failed
  with warnings.catch_warnings():
    # Active when the failure's traceback, which holds the coroutines never started, goes.
    warnings.filterwarnings('ignore', message='coroutine .* was never awaited',
                            category=RuntimeWarning)
    try:
      return read(), None
    except Exception as error:  # pylint: disable=broad-except
      logging.debug('The checkpoint read failed.', exc_info=True)
      _reads_failed = True
      _drop_leftovers_of_failed_reads()
      # Orbax wraps tensorstore's error (which names the file and the damage) in its own.
      while error.__cause__ is not None:
        error = error.__cause__
      reason = _first_line(error)
    gc.collect()
  return None, reason


def _structure(tree) -> dict[str, tuple]:
  """{leaf name: (shape, dtype)} of arrays, ShapeDtypeStructs or orbax's array metadata."""
  return {name: (tuple(x.shape), np.dtype(x.dtype)) for name, x in _leaves_by_name(tree).items()}


def _difference(saved, expected) -> str | None:
  """The first difference between the saved structure and the expected one, in words."""
  saved, expected = _structure(saved), _structure(expected)
  for name in sorted(set(saved) | set(expected)):
    if name not in expected:
      return f'it holds {name}, which the expected variables do not have'
    if name not in saved:
      return f'it lacks {name}'
    if saved[name] != expected[name]:
      (shape, dtype), (want_shape, want_dtype) = saved[name], expected[name]
      return (f'{name} is {dtype.name}{list(shape)} there, {want_dtype.name}{list(want_shape)} '
              'expected')
  return None


def _unreadable(directory: epath.Path, target, what: str) -> str | None:
  """Why the array metadata of an orbax checkpoint directory does not read, or None; a
  ConfigError naming `what` if it holds another structure than `target` (if given)."""
  # The handler, not a Checkpointer: a training checkpoint's item has no step metadata of its
  # own, which a Checkpointer would log as missing.
  with contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
    saved, reason = _attempt(lambda: handler.metadata(directory).tree)
  difference = _difference(saved, target) if reason is None and target is not None else None
  if difference is not None:
    raise ConfigError(
        f'{what} holds variables of another structure than this code builds ({difference}): the '
        'model\'s code or a library changed since it was saved, and nothing was moved or deleted; '
        'use another workdir (or baseline_dir) to train with this code, or the version that saved '
        'it to read it.', settings=('workdir', 'baseline_dir'))
  return reason


def load_variables(path, like=None):
  """Loads variables saved by `save_variables`, checked against their checksums.

  `like` (arrays or jax.ShapeDtypeStruct with shardings) fixes the structure, dtypes and
  placement; without it the saved structure is restored onto the default device. A
  DataError names the directory and the first failure if they do not restore (a damaged or
  missing file, values that differ from their checksums); a ConfigError names the first
  difference if they have another structure than `like` (tree, shape or dtype); nothing changes.
  """
  path = epath.Path(path)
  target = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  reason = _unreadable(path, target, str(path))
  if reason is None:
    with contextlib.closing(ocp.StandardCheckpointer()) as checkpointer:
      variables, reason = _attempt(lambda: checkpointer.restore(path, target))
  if reason is None and (path / CHECKSUMS).exists():
    try:
      expected = read_json(path / CHECKSUMS)
    except DataError:
      reason = f'its {CHECKSUMS} is damaged'
    else:
      reason = _checksum_failure(variables, expected)
  if reason is not None:
    raise DataError(f'the variables in {path} do not restore ({reason}).')
  return variables


class RunCheckpoints:
  """The training checkpoints of one stage: a pytree of arrays plus a JSON log, per step.
  Saving is asynchronous, so an epoch's checkpoint overlaps the next epoch's training."""

  def __init__(self, stage_dir, max_to_keep: int = 2):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._directory = epath.Path(stage_dir) / CHECKPOINTS
    self._manager = ocp.CheckpointManager(self._directory, options=options,
                                          item_names=('state', 'log'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree, log: Mapping[str, Any]) -> None:
    """Starts saving `tree` and `log` (JSON-able; the arrays' checksums added) as `step`."""
    log = {**log, _LOG_CHECKSUMS: checksums(tree)}
    with naming(self._directory / str(step)):
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree), log=ocp.args.JsonSave(log)), force=True)

  def restore_latest(self, like):
    """(tree, log) of the newest checkpoint that restores, or None if there is none; `like`
    (arrays or ShapeDtypeStructs of the saved structure) gives the restored arrays' dtypes and
    shardings. A damaged checkpoint (as in `load_variables`) is logged, moved to CORRUPT/<step>
    and skipped for the next newest; when none restores, a DataError names the stage and the
    first failure. One of another structure than `like` is a ConfigError naming the stage and
    the first difference; nothing is moved."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    stage = self._directory.parent
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      reason = _unreadable(self._directory / str(step) / 'state', target,
                           f'checkpoint {step} of stage {stage}')
      if reason is None:
        restored, reason = _attempt(lambda step=step: self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                          log=ocp.args.JsonRestore())))
      if reason is None:
        reason = _checksum_failure(restored.state, restored.log.get(_LOG_CHECKSUMS))
      if reason is not None:
        logging.warning('Checkpoint %s of %s does not restore (%s); skipping it.', step,
                        self._directory, reason)
        failures.append((step, reason))
        self._set_aside(step)
        continue
      if failures:
        logging.warning('Resuming %s from checkpoint %d instead of the damaged %s.',
                        self._directory, step, ', '.join(str(s) for s, _ in failures))
      return restored.state, {k: v for k, v in restored.log.items() if k != _LOG_CHECKSUMS}
    if failures:
      step, reason = failures[0]
      raise DataError(f'no checkpoint of stage {stage} restores: '
                      f'{self._directory / str(step)} fails with {reason!r}; they are set aside '
                      f'in {stage / CORRUPT}, and a rerun trains the stage again.')
    return None

  def _set_aside(self, step: int) -> None:
    # Out of the manager's directory, so that training can save this step again.
    if jax.process_index() == 0:
      aside = self._directory.parent / CORRUPT
      aside.mkdir(parents=True, exist_ok=True)
      target = aside / str(step)
      if target.exists():
        target = aside / f'{step}.{int(time.time())}'
      if '://' in str(target):
        storage.move(str(self._directory / str(step)), str(target))
      else:
        (self._directory / str(step)).rename(target)
    self._manager.reload()

  def wait(self) -> None:
    with naming(self._directory):
      self._manager.wait_until_finished()

  def close(self) -> None:
    with naming(self._directory):
      self._manager.close()


_SYNC_CHECKS = itertools.count(1)


class Signals:
  """How a command-line run stops on SIGTERM (preemption) and Ctrl-C: work saved, claims released.

  Entry points install the handlers (`installed`, one process); library calls install none,
  so a notebook's Ctrl-C interrupts as Python's does and SIGTERM ends the process. With the
  handlers up, a signal inside a `deferred` section (the training loop, a stage's final
  writes) is noted: the loop asks `reached()` after every call and there saves and raises
  `stop(step)`, and the outermost section that ends with a signal noted raises `stop()`. A
  signal anywhere else (scoring, waiting for a claim) raises where the program is, releasing
  what it holds on the way out. A second Ctrl-C interrupts at once.

  Several processes must stop at the same step, so there no handler is installed: JAX's
  receives the SIGTERM, the coordination service passes it to every process, and orbax's
  `reached_preemption` picks the first check none has passed; there all save and stop. Check
  numbers must only grow and match across processes (`_SYNC_CHECKS`, over all stages). A
  SIGTERM after a stage's last check stops the run at the next stage's first; after the
  run's last, the run simply finishes.
  """

  def __init__(self):
    self._previous, self._deferring = {}, 0
    self.noted = None  # The signal a deferred section has not acted on yet.

  @contextlib.contextmanager
  def installed(self):
    """Installs the handlers for the duration (from the main thread, once; else nothing)."""
    if self._previous or threading.current_thread() is not threading.main_thread():
      yield
      return
    self._previous = {signum: signal.signal(signum, self._handle)
                      for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield
    finally:
      for signum, previous in self._previous.items():
        signal.signal(signum, previous)
      self._previous, self.noted = {}, None

  def _handle(self, signum, frame):
    del frame
    if self._deferring:
      if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
        logging.warning('Ctrl-C: saving at the next step, then exiting (Ctrl-C again to stop '
                        'at once, losing the steps since the last checkpoint).')
      else:
        logging.warning('SIGTERM received: saving at the next step, then exiting.')
      self.noted = signum
      return
    if signum == signal.SIGINT:
      raise KeyboardInterrupt
    # The way out (releasing claims) must not be cut short by another one.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Preempted()

  @contextlib.contextmanager
  def deferred(self):
    """Within, a signal is noted rather than acted on where it arrives (class docstring)."""
    self._deferring += 1
    try:
      yield
    except BaseException:
      self._deferring -= 1
      if not self._deferring:
        self.noted = None
      raise
    self._deferring -= 1
    if not self._deferring and self.noted is not None:
      raise self.stop()

  def reached(self) -> bool:
    """Whether to save and stop now; every process makes the same calls."""
    if jax.process_count() > 1:
      return ocp.multihost.reached_preemption(next(_SYNC_CHECKS))
    return self.noted is not None

  def stop(self, step: int | None = None, stage: str = '') -> Preempted:
    """The exception that ends the run for the noted signal (no longer noted): Interrupted
    for Ctrl-C, else Preempted; `step` is the step of `stage` it saved, if any."""
    interrupted, self.noted = self.noted == signal.SIGINT, None
    return (Interrupted if interrupted else Preempted)(step, stage)


SIGNALS = Signals()
