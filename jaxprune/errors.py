"""The one exception type users see: a wrong value, named, with what is allowed."""


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
