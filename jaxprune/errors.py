"""What a user did or what stopped a run, as opposed to a bug.

`ConfigError` (a wrong value or file; `DataError`: a data file), `Preempted` / `Interrupted`
(a SIGTERM / Ctrl-C stopped training after a checkpoint was saved) and `Diverged`
(`train.loop`'s rule). Every other exception is a bug and keeps its traceback. Command-line
entry points wrap their work in `exit_on_user_error()`, which turns these, a lost process of
a multi-process run (`lost_process`), storage failures that are no bug (`storage_error`: no
space left, read-only storage, ...) and a Ctrl-C outside training into one line and an exit
status (`EXIT_STATUS`).
"""

import contextlib
import errno
import os
import re
import sys
from typing import Iterable, Iterator


class ConfigError(ValueError):
  """A wrong setting, named with what is allowed (one sentence). Library code names settings
  plainly (`prune_ratio`) and lists them in `settings`; a command line prints them as flags."""

  def __init__(self, message: str, settings: Iterable[str] = ()):
    super().__init__(message)
    self.settings = tuple(settings)


class DataError(ConfigError):
  """A data file the user supplied cannot be used (missing, unreadable, wrong keys or shapes)."""


class Preempted(Exception):
  """A SIGTERM stopped the run, after saving training at `step` (None: outside training, with
  finished stages and the last checkpoint kept); rerun the same command to resume."""
  _what = 'preempted'

  def __init__(self, step: int | None = None, stage: str = ''):
    saved = ('finished stages and the last checkpoint are kept' if step is None else
             f"step {step}{f' of {stage}' if stage else ''} is saved")
    super().__init__(f'{self._what}: {saved}; rerun the same command to resume.')
    self.step, self.stage = step, stage


class Interrupted(Preempted):
  """Ctrl-C (SIGINT) stopped the run, as Preempted says; rerun to resume."""
  _what = 'interrupted'


class Diverged(Exception):
  """Training diverged (`reason`, e.g. a loss that is not finite, at `step` of `epoch`);
  nothing after the last healthy checkpoint (`resume_step`, 0: none) was saved."""

  def __init__(self, stage: str, epoch: int, step: int, resume_step: int, reason: str):
    kept = (f'the healthy checkpoint of step {resume_step} is kept, and rerunning with a smaller '
            'lr resumes from it' if resume_step else
            'no healthy checkpoint came before it, so rerunning with a smaller lr starts the '
            'stage again')
    super().__init__(f'training diverged in stage {stage}: {reason} at epoch {epoch}, step '
                     f'{step}; {kept}.')
    self.stage, self.reason, self.epoch, self.step = stage, reason, epoch, step
    self.resume_step = resume_step


# Exit statuses of the command-line tools. 75 is EX_TEMPFAIL: "try again", which is what a
# preempted run needs (a scheduler may requeue on it); 130 is the shell's for Ctrl-C.
EXIT_STATUS = {ConfigError: 1, Diverged: 3, Preempted: 75, Interrupted: 130}
# A lost process is retried like a preemption: the rerun resumes from the last checkpoint.
LOST_PROCESS_STATUS = 75

# OSError numbers that say the storage cannot take what a run writes or reads: no bug.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                            errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EIO})


def choose(kind: str, value: str, allowed, setting: str | None = None) -> None:
  """Raises ConfigError unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ConfigError(f"unknown {kind} {value!r}; choose one of: {', '.join(sorted(allowed))}.",
                      settings=(setting,) if setting else ())


def as_flags(error: ConfigError) -> str:
  """The message with every setting it names written as its flag (`--prune_ratio`)."""
  message = str(error)
  for name in error.settings:
    # A whole word, not part of a path, a file name or a flag already.
    message = re.sub(rf'(?<![\w\-/.]){re.escape(name)}(?![\w/-])', f'--{name}', message)
  return message


# Tensorstore (under orbax) reports an OS failure as a ValueError whose message ends in
# "[os_error_code='28']" and quotes the file it failed on.
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='(\d+)'")
_TENSORSTORE_FILE = re.compile(r'(?:Failed writing|local file): "([^"]+)"')
# Where a checkpoint's own files start: the path above them names what was being saved.
_CHECKPOINT_INTERNALS = re.compile(r'(\.orbax-checkpoint-tmp|/ocdbt\.process_|/d/[0-9a-f]{16})')


def _tensorstore_os_error(error: BaseException) -> OSError | None:
  code = _TENSORSTORE_OS_ERROR.search(str(error))
  if code is None or int(code.group(1)) not in STORAGE_ERRNOS:
    return None
  number = int(code.group(1))
  path = _TENSORSTORE_FILE.search(str(error))
  filename = _CHECKPOINT_INTERNALS.split(path.group(1))[0] if path else None
  return OSError(number, os.strerror(number), filename)


def _chain(error: BaseException | None) -> Iterator[BaseException]:
  """`error` and what caused it, in turn, each once."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def storage_error(error: BaseException) -> OSError | None:
  """The OSError of a storage failure (STORAGE_ERRNOS) that caused `error`, if one did
  (libraries such as orbax re-raise it inside their own exceptions)."""
  for cause in _chain(error):
    if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
      return cause
    found = _tensorstore_os_error(cause)
    if found is not None:
      return found
  return None


def describe_storage_error(error: OSError) -> str:
  """'cannot write PATH: No space left on device.'"""
  verb = 'write' if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else 'use'
  where = f' {error.filename}' if error.filename else ''
  return f'cannot {verb}{where}: {error.strerror or error}.'


# How XLA's CPU collectives (gloo) and JAX's coordination service report that a peer process
# is gone: its connection reset, its heartbeats stopped, or the service itself unreachable.
_LOST_PROCESS = re.compile(r'Gloo [\w-]+ failed|Connection (?:reset|closed) by peer|'
                           r'heartbeat timeout|tasks are unhealthy|coordination service')


def lost_process(error: BaseException) -> str | None:
  """The first line of `error` or a cause of it saying another process of the run is gone."""
  for cause in _chain(error):
    text = str(cause).strip()
    if _LOST_PROCESS.search(text):
      return text.splitlines()[0]
  return None


def _exit_now(status: int) -> None:
  # Skips interpreter shutdown: a failed checkpoint write's leftover callbacks would print
  # tracebacks under the sentence, and JAX's exit handler would wait for lost processes.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def _drop_closed_event_loop_callbacks(unraisable) -> None:
  # A failed checkpoint write leaves tensorstore callbacks that fire into the event loop
  # orbax has closed; each would print a traceback above the one-line error.
  error = unraisable.exc_value
  if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
    sys.__unraisablehook__(unraisable)


@contextlib.contextmanager
def exit_on_user_error():
  """For command-line entry points: what the module docstring lists ends the process with
  'error: MESSAGE' (or the preemption line) on stderr and its exit status, no traceback."""
  previous_hook = sys.unraisablehook
  sys.unraisablehook = _drop_closed_event_loop_callbacks
  try:
    yield
  except ConfigError as error:
    sys.stderr.write(f'error: {as_flags(error)}\n')
    sys.exit(EXIT_STATUS[ConfigError])
  except Diverged as error:
    sys.stderr.write(f'error: {error}\n')
    sys.exit(EXIT_STATUS[Diverged])
  except (Preempted, KeyboardInterrupt) as error:
    stopped = error if isinstance(error, Preempted) else Interrupted()
    sys.stderr.write(f'{stopped}\n')
    sys.exit(EXIT_STATUS[type(stopped)])
  except Exception as error:  # pylint: disable=broad-except
    lost = lost_process(error)
    if lost is not None:
      sys.stderr.write('error: another process of this multi-process run stopped or cannot be '
                       f'reached ({lost}); the last checkpoint is kept, and the same command '
                       'on every process resumes from it.\n')
      _exit_now(LOST_PROCESS_STATUS)
    cause = storage_error(error)
    if cause is None:
      raise
    sys.stderr.write(f'error: {describe_storage_error(cause)}\n')
    _exit_now(EXIT_STATUS[ConfigError])
  finally:
    sys.unraisablehook = previous_hook
