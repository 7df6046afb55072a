"""What a user did or what stopped a run, as opposed to a bug.

* `ConfigError`: a value the user typed or a file they supplied is wrong; the message is one
  sentence naming the value and what is allowed. `DataError` is its sibling for data files.
* `Preempted`: a SIGTERM stopped training after a checkpoint was saved; rerunning the same
  command resumes from it.
* `Diverged`: the training loss became non-finite; the stage's last good checkpoint is kept
  and a rerun (e.g. with a smaller learning rate) resumes from it.

Every other exception is a bug and keeps its traceback. Command-line entry points wrap their
work in `exit_on_user_error()`, which turns exactly these four into one line and an exit
status (`EXIT_STATUS`).
"""

import contextlib
import re
import sys
from typing import Iterable


class ConfigError(ValueError):
  """A wrong setting, named with what is allowed (one sentence).

  Library code names settings by their plain names (`prune_ratio`) and lists them in
  `settings`; a command line prints them as its flags (`--prune_ratio`).
  """

  def __init__(self, message: str, settings: Iterable[str] = ()):
    super().__init__(message)
    self.settings = tuple(settings)


class DataError(ConfigError):
  """A data file the user supplied cannot be used (missing, unreadable, wrong keys or shapes)."""


class Preempted(Exception):
  """Training stopped on SIGTERM at `step`, after saving it; rerun the same command to resume."""

  def __init__(self, step: int, stage: str = ''):
    where = f' of {stage}' if stage else ''
    super().__init__(f'preempted: step {step}{where} is saved; rerun the same command to resume.')
    self.step = step
    self.stage = stage


class Diverged(Exception):
  """The training loss became non-finite; nothing after the last good checkpoint was saved."""

  def __init__(self, stage: str, epoch: int, step: int, resume_step: int):
    kept = (f'the checkpoint of step {resume_step} is kept, and rerunning with a smaller lr '
            'resumes from it' if resume_step else
            'no checkpoint came before it, so rerunning with a smaller lr starts the stage again')
    super().__init__(f'training diverged in stage {stage}: the loss is not finite at epoch '
                     f'{epoch}, step {step}; {kept}.')
    self.stage = stage
    self.epoch = epoch
    self.step = step
    self.resume_step = resume_step


# Exit statuses of the command-line tools. 75 is EX_TEMPFAIL: "try again", which is what a
# preempted run needs (a scheduler may requeue on it).
EXIT_STATUS = {ConfigError: 1, Diverged: 3, Preempted: 75}


def choose(kind: str, value: str, allowed, setting: str | None = None) -> None:
  """Raises ConfigError unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ConfigError(f"unknown {kind} {value!r}; choose one of: {', '.join(sorted(allowed))}.",
                      settings=(setting,) if setting else ())


def as_flags(error: ConfigError) -> str:
  """The message with every setting it names written as the flag (`prune_ratio` -> `--prune_ratio`)."""
  message = str(error)
  for name in error.settings:
    # A whole word, not part of a path, a file name or a flag already.
    message = re.sub(rf'(?<![\w\-/.]){re.escape(name)}(?![\w/-])', f'--{name}', message)
  return message


@contextlib.contextmanager
def exit_on_user_error():
  """For command-line entry points: a ConfigError, Preempted or Diverged raised inside ends
  the process with 'error: MESSAGE' (or the preemption line) on stderr and its EXIT_STATUS,
  without a traceback. Anything else propagates with its traceback."""
  try:
    yield
  except ConfigError as error:
    sys.stderr.write(f'error: {as_flags(error)}\n')
    sys.exit(EXIT_STATUS[ConfigError])
  except Diverged as error:
    sys.stderr.write(f'error: {error}\n')
    sys.exit(EXIT_STATUS[Diverged])
  except Preempted as error:
    sys.stderr.write(f'{error}\n')
    sys.exit(EXIT_STATUS[Preempted])
