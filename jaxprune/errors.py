"""The one exception type users see: a wrong value, named, with what is allowed."""

import contextlib
import sys


class ConfigError(ValueError):
  """A user-facing error whose message is one sentence naming the bad value.

  `launch.py` and the command-line tools print the message alone (no traceback);
  library callers can catch it like any ValueError.
  """


def choose(kind: str, value: str, allowed) -> None:
  """Raises ConfigError unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ConfigError(
        f"unknown {kind} {value!r}; choose one of: {', '.join(sorted(allowed))}."
    )


@contextlib.contextmanager
def exit_on_config_error():
  """For command-line entry points: a ConfigError raised inside ends the process with
  'error: MESSAGE' on stderr and exit status 1, and no traceback."""
  try:
    yield
  except ConfigError as error:
    sys.exit(f'error: {error}')
