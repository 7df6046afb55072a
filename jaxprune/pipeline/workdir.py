"""Work and stage directories as the outside world sees them: checks, identity and claims.

* `check_workdir` / `check_baseline_dir`: refuse a path that cannot be a work directory
  (empty, a regular file, under one) or a baseline stage (another run's work directory, a
  prune or regime stage, a directory of other files) before anything is written.
* `unstarted`: a stage directory that holds nothing computed, whose identity may be replaced.
* `claimed`: a claim file (`claim.json`) naming the process that trains a directory.
  A claim held by a live process is waited for (a shared baseline: the second run reuses
  it once the first has trained it) or refused (a work directory: two processes training
  the same stages would do the work twice and write each other's checkpoints). A claim
  whose process died is taken over: on the same host when its pid is gone, on any host
  when its heartbeat (rewritten every `HEARTBEAT_S`) is older than `STALE_S`.

Claims are files in the claimed directory, so they work on any storage every host sees.
On a local disk the claim is created atomically (O_EXCL); on object stores (gs://), which
have no exclusive create, the claim is written and read back, and the last writer holds
it: two processes starting within the same second on a bucket can still collide.
"""

import contextlib
import errno
import json
import os
import socket
import threading
import time
from typing import Iterator

import jax
from absl import logging
from etils import epath

from jaxprune import multihost
from jaxprune.errors import ConfigError
from jaxprune.train import checkpoint

CLAIM = 'claim.json'
STAGE_CONFIG = 'stage_config.json'
HEARTBEAT_S = 10.0
STALE_S = 120.0
WAIT_POLL_S = 2.0
WAIT_LOG_S = 60.0
# What a stage directory holds before anything of it is computed: its identity, its claim,
# and (the baseline) its initial variables, made from the identity's model and seed.
_UNSTARTED = frozenset({STAGE_CONFIG, CLAIM, 'init'})
# Errors that mean "this storage cannot be written", not a bug.
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def _local(path: epath.Path) -> bool:
  return '://' not in str(path)


def check_workdir(path: str, setting: str = 'workdir') -> None:
  """Raises ConfigError unless `path` can be (or already is) a directory."""
  if not path:
    raise ConfigError(f'{setting} is empty; give a directory (a local path or gs://...).',
                      settings=(setting,))
  if '://' in path:
    return
  current = os.path.abspath(path)
  while True:
    if os.path.exists(current) and not os.path.isdir(current):
      where = 'is' if current == os.path.abspath(path) else f'lies under {current!r}, which is'
      raise ConfigError(f'{setting} {path!r} {where} a file, not a directory.',
                        settings=(setting,))
    parent = os.path.dirname(current)
    if parent == current:
      return
    current = parent


def _identity(stage: epath.Path) -> dict | None:
  path = stage / STAGE_CONFIG
  return json.loads(path.read_text()) if path.exists() else None


def check_baseline_dir(path: epath.Path, prune_settings, workdir: epath.Path) -> None:
  """Raises ConfigError unless `path` is a baseline stage, empty or absent, and is not
  another stage of `workdir`.

  `prune_settings` are the names only a prune or regime stage's identity holds.
  """
  shown = str(path)
  if _local(path) and _local(workdir):
    base, work = os.path.abspath(shown), os.path.abspath(str(workdir))
    if base != os.path.join(work, 'baseline') and (
        base == work or base.startswith(work + os.sep) or work.startswith(base + os.sep)):
      raise ConfigError(f'baseline_dir {shown!r} overlaps workdir {str(workdir)!r}; give the '
                        'baseline a directory of its own (or leave baseline_dir unset: the '
                        'baseline then lives in workdir/baseline).',
                        settings=('baseline_dir', 'workdir'))
  if not path.exists():
    return
  if not path.is_dir():
    raise ConfigError(f'baseline_dir {shown!r} is a file, not a directory.',
                      settings=('baseline_dir',))
  identity = _identity(path)
  if identity is not None:
    foreign = sorted(set(identity) & set(prune_settings))
    if foreign:
      raise ConfigError(f'baseline_dir {shown!r} is a prune or regime stage (its '
                        f'{STAGE_CONFIG} holds {foreign[0]}), not a baseline stage.',
                        settings=('baseline_dir',))
    return
  names = {p.name for p in path.iterdir() if not p.name.startswith(CLAIM)}
  if names & {'baseline', 'prune', 'results.json'}:
    raise ConfigError(f'baseline_dir {shown!r} is the work directory of another run; its '
                      f'baseline stage is {str(path / "baseline")!r}.',
                      settings=('baseline_dir',))
  if names and not all(n.startswith('seed') for n in names):
    raise ConfigError(f'baseline_dir {shown!r} holds other files ({sorted(names)[0]}, ...) but '
                      f'no {STAGE_CONFIG}: it is not a baseline stage; give an empty or new '
                      'directory.', settings=('baseline_dir',))


def unstarted(stage: epath.Path) -> bool:
  """Whether `stage` holds nothing computed (only its identity, claim or initial variables)."""
  return all(p.name in _UNSTARTED or p.name.startswith(CLAIM) for p in stage.iterdir())


def _me() -> dict:
  now = time.time()
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'since': now, 'heartbeat': now}


def _key(holder: dict) -> tuple:
  return holder['host'], holder['pid'], holder['since']


def _read_claim(path: epath.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except ValueError:
    # Created but not yet written by its holder: held until it is as old as a stale heartbeat.
    written = os.path.getmtime(os.fspath(path)) if _local(path) else time.time()
    return {'host': '?', 'pid': -1, 'since': written, 'heartbeat': written}


def _alive(holder: dict) -> bool:
  if time.time() - holder['heartbeat'] > STALE_S:
    return False
  if holder['host'] != socket.gethostname():
    return True
  try:
    os.kill(holder['pid'], 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


def describe(holder: dict) -> str:
  since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['since']))
  return f"process {holder['pid']} on {holder['host']} (since {since})"


def _create(path: epath.Path, holder: dict) -> bool:
  """Creates the claim file with `holder`; False if another process holds it now."""
  text = json.dumps(holder)
  if _local(path):
    try:
      fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with checkpoint.naming(path), os.fdopen(fd, 'w') as f:
      f.write(text)
    return True
  if path.exists():
    return False
  with checkpoint.naming(path):
    path.write_text(text)
  time.sleep(1.0)  # let a concurrent writer's object land, then see who holds it
  return _read_claim(path) == holder


class _Heartbeat(threading.Thread):
  """Rewrites the claim's heartbeat until stopped, so other hosts see the holder alive."""

  def __init__(self, path: epath.Path, holder: dict):
    super().__init__(daemon=True, name=f'claim heartbeat {path}')
    self._path, self._holder = path, holder
    self._stop_event = threading.Event()

  def run(self):
    while not self._stop_event.wait(HEARTBEAT_S):
      current = _read_claim(self._path)
      if current is None or _key(current) != _key(self._holder):
        # Taken over after this process was thought dead (e.g. suspended for minutes):
        # renewing would overwrite the new holder's claim.
        logging.error('the claim %s now belongs to %s; not renewing it.', self._path,
                      describe(current) if current else 'nobody')
        return
      self._holder['heartbeat'] = time.time()
      tmp = self._path.parent / (self._path.name + f'.{os.getpid()}.tmp')
      try:
        tmp.write_text(json.dumps(self._holder))
        tmp.replace(self._path)
      except OSError as error:
        logging.warning('could not renew the claim %s: %s', self._path, error)

  def stop(self):
    self._stop_event.set()
    self.join()


@contextlib.contextmanager
def claimed(directory: epath.Path, *, wait: bool, what: str, settings=()) -> Iterator[None]:
  """Holds `directory`'s claim for the duration. In a multi-process run process 0 claims for
  the run: every process gets its outcome (a refusal is every process's ConfigError), and
  all have done their checks of the directory before any goes on to write in it.

  Args:
    directory: the directory to claim (created if absent).
    wait: wait for a live holder to finish (True) or refuse with ConfigError (False).
    what: how messages name the directory ('workdir W', 'baseline B').
    settings: the settings a refusal names.
  """
  path = directory / CLAIM

  def acquire() -> dict | None:
    try:
      directory.mkdir(parents=True, exist_ok=True)
      return _acquire(path, _me(), wait=wait, what=what, settings=settings)
    except OSError as error:
      if error.errno not in READ_ONLY_ERRNOS:
        raise
      # Read-only storage: a finished run can still be read and its table printed; anything
      # that must be written fails on its own, naming the path.
      logging.warning('cannot claim %s (%s); reading it without a claim.', what, error.strerror)
      return None

  acquired = multihost.agree(f'claim of {what}', acquire)
  multihost.barrier(f'claimed {what}')
  if jax.process_index() != 0 or acquired is None:
    yield
    return
  heartbeat = _Heartbeat(path, acquired)
  heartbeat.start()
  try:
    yield
  finally:
    heartbeat.stop()
    current = _read_claim(path)
    if current is not None and _key(current) == _key(acquired):
      path.unlink()


def _acquire(path: epath.Path, holder: dict, *, wait: bool, what: str, settings) -> dict:
  last_log = 0.0
  while True:
    if _create(path, holder):
      return holder
    current = _read_claim(path)
    if current is None:
      continue  # released between our attempt and the read
    if not _alive(current):
      logging.warning('%s was claimed by %s, which is gone; taking it over.', what,
                      describe(current))
      with contextlib.suppress(FileNotFoundError):
        path.unlink()
      continue
    if not wait:
      raise ConfigError(f'{what} is in use by {describe(current)}; wait for that run to end, '
                        'or use another directory.', settings=settings)
    if time.time() - last_log > WAIT_LOG_S:
      logging.info('Waiting for %s: %s is training it.', what, describe(current))
      last_log = time.time()
    time.sleep(WAIT_POLL_S)
