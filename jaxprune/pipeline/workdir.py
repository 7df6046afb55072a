"""Work and stage directories as the outside world sees them: checks, identity and claims.

`claimed` holds a claim file (`claim.json`) naming the process that trains a directory. A
live holder's claim is waited for (a shared baseline, reused once trained) or refused (a work
directory: two processes would do the work twice and overwrite each other's checkpoints). A
dead holder's claim is taken over: on the same host when its pid is gone, on any host when
its heartbeat (rewritten every `HEARTBEAT_S`) is older than `STALE_S`. A heartbeat more than
`CLOCK_SKEW_S` ahead of this host's clock is logged as clock skew and aged from when this
process first saw it; such a claim from another host refuses a work directory only once it
is seen renewed.

Claims live in the claimed directory, so they work on any storage every host sees: on a disk
created atomically (O_EXCL); on gs:// every change is conditional on the object's generation
(`jaxprune.storage`), so of several processes claiming at once exactly one holds it.
"""

import contextlib
import errno
import json
import os
import pathlib
import socket
import stat
import threading
import time
from typing import Iterator

import jax
from absl import logging
from etils import epath

from jaxprune import errors, multihost, storage
from jaxprune.errors import ConfigError, DataError
from jaxprune.train import checkpoint

CLAIM = 'claim.json'
STAGE_CONFIG = 'stage_config.json'
HEARTBEAT_S = 10.0
STALE_S = 120.0
CLOCK_SKEW_S = 60.0
WAIT_POLL_S = 2.0
WAIT_LOG_S = 60.0
# A stage holding only these has nothing computed: init/ is made from its identity's settings.
_UNSTARTED = frozenset({STAGE_CONFIG, CLAIM, 'init'})
# Errors that mean "this storage cannot be written", not a bug.
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def _local(path: epath.Path) -> bool:
  return '://' not in str(path)


def check_workdir(path: str, setting: str = 'workdir') -> None:
  """ConfigError unless `path` can be (or is) a directory of this run: not a file or under
  one, not under a dangling symbolic link or a loop of them, not inside another run's stage
  directory (nor one itself, for a workdir), with no line break (a flagfile line cannot hold
  one). A URL must be a gs:// one its bucket allows (`storage.check`)."""
  if not path:
    raise ConfigError(f'{setting} is empty; give a directory (a local path or gs://...).',
                      settings=(setting,))
  if '://' in path:
    storage.check(path, setting)
    return
  if '\n' in path or '\r' in path:
    raise ConfigError(f'{setting} {path!r} holds a line break, which launch.flags cannot store; '
                      'give a name without one.', settings=(setting,))
  given = os.path.abspath(path)
  for current in (given, *map(str, pathlib.PurePath(given).parents)):
    where = 'is' if current == given else f'lies under {current!r}, which is'
    try:
      status = os.stat(current)
    except OSError as error:
      # A missing directory is made; under a file (ENOTDIR) its parent says so; an unreadable
      # one (EACCES) fails, naming itself, when it is written.
      if error.errno == errno.ELOOP and os.path.islink(current):
        raise ConfigError(f'{setting} {path!r} {where} a loop of symbolic links; give a '
                          'directory that resolves.', settings=(setting,)) from None
      if error.errno == errno.ENOENT and os.path.islink(current):
        raise ConfigError(f'{setting} {path!r} {where} a symbolic link to '
                          f'{os.readlink(current)!r}, which does not exist; create that '
                          'directory or give another one.', settings=(setting,)) from None
    else:
      if not stat.S_ISDIR(status.st_mode):
        raise ConfigError(f'{setting} {path!r} {where} a file, not a directory.',
                          settings=(setting,))
      if ((current != given or setting == 'workdir')
          and os.path.isfile(os.path.join(current, STAGE_CONFIG))):
        raise ConfigError(f'{setting} {path!r} {where} a stage directory of another run (it '
                          f'holds {STAGE_CONFIG}); give a directory outside every run\'s '
                          'stages.', settings=(setting,))


def identity(stage: epath.Path) -> dict | None:
  """The settings `stage` was made with (its stage_config.json), or None if it records none.
  A damaged record counts as none in an unstarted stage, else is a DataError."""
  path = stage / STAGE_CONFIG
  if not path.exists():
    return None
  try:
    return checkpoint.read_json(
        path, f'it records the settings {stage} was made with: if this command\'s settings '
        'made it, delete the file and rerun (they are recorded again), else use another '
        'workdir (or baseline_dir).', settings=('workdir', 'baseline_dir'))
  except DataError:
    if not unstarted(stage):
      raise
    logging.warning('%s holds nothing computed yet: its damaged %s is replaced by this run\'s '
                    'settings.', stage, STAGE_CONFIG)
    return None


def check_baseline_dir(path: epath.Path, prune_settings, workdir: epath.Path) -> None:
  """ConfigError unless `path` is a baseline stage, empty or absent, and not another stage
  of `workdir`; `prune_settings` are the names only a prune or regime stage's identity holds."""
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
  recorded = identity(path)
  foreign = sorted(set(recorded or ()) & set(prune_settings))
  if foreign:
    raise ConfigError(f'baseline_dir {shown!r} is a prune or regime stage (its '
                      f'{STAGE_CONFIG} holds {foreign[0]}), not a baseline stage.',
                      settings=('baseline_dir',))
  if recorded is not None or unstarted(path):
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


def _holder(text: str, written) -> dict:
  """The holder a claim's `text` names; one that names none (not yet written, or damaged)
  is held until a heartbeat `written()` (when it was written) would be stale."""
  try:
    holder = json.loads(text)
  except ValueError:
    holder = None
  if isinstance(holder, dict) and {'host', 'pid', 'since', 'heartbeat'} <= holder.keys():
    return holder
  when = written()
  return {'host': '?', 'pid': -1, 'since': when, 'heartbeat': when}


def _alive(holder: dict, heartbeat: float | None = None) -> bool:
  """Whether the holder may still be running: its heartbeat (or `heartbeat`, the time this
  process counts it from) is not stale, and on this host its process exists."""
  if time.time() - (holder['heartbeat'] if heartbeat is None else heartbeat) > STALE_S:
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


class _DiskClaim:
  """A claim file on a disk: created with O_EXCL, renewed by writing it aside and renaming it."""

  def __init__(self, path: epath.Path):
    self.path = path

  def read(self) -> dict | None:
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    return _holder(text, lambda: os.path.getmtime(os.fspath(self.path)))

  def create(self, holder: dict) -> bool:
    """Creates the claim naming `holder`; False if another process holds it."""
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with checkpoint.naming(self.path), os.fdopen(fd, 'w') as f:
      f.write(json.dumps(holder))
    return True

  def take_over(self, holder: dict) -> bool:
    """Replaces the dead claim last read by one naming `holder`; False if another was first."""
    with contextlib.suppress(FileNotFoundError):
      self.path.unlink()
    return self.create(holder)

  def renew(self, holder: dict) -> bool:
    """Rewrites the claim with `holder`'s heartbeat; False if another process holds it."""
    current = self.read()
    if current is None or _key(current) != _key(holder):
      return False
    tmp = self.path.parent / (self.path.name + f'.{os.getpid()}.tmp')
    tmp.write_text(json.dumps(holder))
    tmp.replace(self.path)
    return True

  def release(self, holder: dict) -> None:
    current = self.read()
    if current is not None and _key(current) == _key(holder):
      self.path.unlink()


class _ObjectClaim:
  """A claim object on gs://, every change conditional on the generation last seen or held."""

  def __init__(self, path: epath.Path):
    self.path = path
    self._url = str(path)
    self._seen = None  # The generation of the claim as last read.
    self._held = None  # The generation of this process's own claim.

  def read(self) -> dict | None:
    found = storage.read(self._url)
    if found is None:
      self._seen = None
      return None
    self._seen = found.generation
    return _holder(found.text, lambda: storage.updated(self._url, found.generation)
                   or time.time())

  def create(self, holder: dict) -> bool:
    self._held = storage.create(self._url, json.dumps(holder))
    return self._held is not None

  def take_over(self, holder: dict) -> bool:
    if self._seen is None:
      return self.create(holder)
    self._held = storage.replace(self._url, json.dumps(holder), self._seen)
    return self._held is not None

  def renew(self, holder: dict) -> bool:
    self._held = storage.replace(self._url, json.dumps(holder), self._held)
    return self._held is not None

  def release(self, holder: dict) -> None:
    del holder  # Its own generation says whether the claim is still this process's.
    if self._held is not None:
      storage.delete(self._url, self._held)


def _claim(path: epath.Path) -> _DiskClaim | _ObjectClaim:
  return _DiskClaim(path) if _local(path) else _ObjectClaim(path)


def _renew(claim: _DiskClaim | _ObjectClaim, holder: dict, stop: threading.Event) -> None:
  """Renews the claim's heartbeat until `stop` is set, so other hosts see the holder alive."""
  while not stop.wait(HEARTBEAT_S):
    holder['heartbeat'] = time.time()
    try:
      renewed = claim.renew(holder)
    except (OSError, ConfigError) as error:
      logging.warning('could not renew the claim %s: %s', claim.path, error)
      continue
    if not renewed:
      # Taken over after this process was thought dead (e.g. suspended for minutes):
      # renewing would overwrite the new holder's claim.
      current = claim.read()
      logging.error('the claim %s now belongs to %s; not renewing it.', claim.path,
                    describe(current) if current else 'nobody')
      return


@contextlib.contextmanager
def claimed(directory: epath.Path, *, wait: bool, what: str, settings=()) -> Iterator[None]:
  """Holds `directory`'s claim (creating it) for the duration; process 0 claims for every
  process, and all have checked the directory before any writes in it. `wait`: wait for a
  live holder to finish, or refuse (ConfigError naming `settings`); `what` names the directory
  in messages ('workdir W', 'baseline B')."""
  claim = _claim(directory / CLAIM)

  def acquire() -> dict | None:
    try:
      directory.mkdir(parents=True, exist_ok=True)
      return _acquire(claim, _me(), wait=wait, what=what, settings=settings)
    except OSError as error:
      if error.errno not in READ_ONLY_ERRNOS:
        if errors.storage_error(error) is not None:
          raise
        # Not storage at all (/proc) or a path that changed under the checks: one sentence.
        failed = f' {error.filename}' if error.filename else ''
        raise ConfigError(f'{what} cannot hold a run\'s files (creating{failed} fails: '
                          f'{error.strerror}); give a directory on writable storage.',
                          settings=settings) from None
      # Read-only storage: a finished run can still be read and its table printed; anything
      # that must be written fails on its own, naming the path.
      logging.warning('cannot claim %s (%s); reading it without a claim.', what, error.strerror)
      return None

  acquired = multihost.agree(f'claim of {what}', acquire)
  multihost.barrier(f'claimed {what}')
  if jax.process_index() != 0 or acquired is None:
    yield
    return
  stop = threading.Event()
  heartbeat = threading.Thread(target=_renew, args=(claim, acquired, stop), daemon=True,
                               name=f'claim heartbeat {claim.path}')
  heartbeat.start()
  try:
    yield
  finally:
    stop.set()
    heartbeat.join()
    claim.release(acquired)


def _acquire(claim: _DiskClaim | _ObjectClaim, holder: dict, *, wait: bool, what: str,
             settings) -> dict:
  last_log = 0.0
  # For a claim whose heartbeat is ahead of this host's clock: (the claim as first read, when
  # this process read it, whether its heartbeat has changed since).
  skewed = None
  while True:
    if claim.create(holder):
      return holder
    current = claim.read()
    if current is None:
      continue  # released between our attempt and the read
    ahead = current['heartbeat'] - time.time()
    if ahead <= CLOCK_SKEW_S:
      skewed = None
    elif skewed is None:
      logging.warning('%s is claimed by %s, whose heartbeat is %.0f s ahead of this host\'s '
                      'clock: the clock of %s is skewed, so the claim counts as renewed now '
                      'and as gone once it goes %.0f s without renewal.', what,
                      describe(current), ahead, current['host'], STALE_S)
      skewed = (current, time.time(), False)
    elif skewed[0] != current:
      skewed = (current, time.time(), True)
    if not _alive(current, skewed[1] if skewed else None):
      logging.warning('%s was claimed by %s, which is gone; taking it over.', what,
                      describe(current))
      if claim.take_over(holder):
        return holder
      continue  # another process took it over first
    # A skewed claim from another host is only known alive once it is renewed.
    watching = skewed is not None and not skewed[2] and current['host'] != socket.gethostname()
    if not wait and not watching:
      skew = (f" (its clock runs {ahead:.0f} s ahead of this host's)" if skewed is not None
              else '')
      raise ConfigError(f'{what} is in use by {describe(current)}{skew}; wait for that run to '
                        'end, or use another directory.', settings=settings)
    if time.time() - last_log > WAIT_LOG_S:
      logging.info('Waiting for %s: %s is training it.', what, describe(current))
      last_log = time.time()
    time.sleep(WAIT_POLL_S)
