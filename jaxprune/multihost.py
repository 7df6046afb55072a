"""Several processes as one run (`jax.distributed`): joining it, and what they agree on.

* `initialize(...)`: joins the run (on a Cloud TPU VM pod, under SLURM or Open MPI JAX
  detects the coordinator, process count and index; elsewhere all three are given). CPU
  collectives go over gloo, so N processes on one machine are a pod too
  (`jaxprune.local_cluster`). Process 0 and every other process then hold a lifeline
  socket: when one is killed or crashes, the others stop within a second with one sentence.
* `agree(name, decide)`: process 0 decides (reads the work directory, takes a claim) and
  every process gets its answer or its ConfigError, so no process skips a stage another
  trains. Answers travel over the lifelines (JAX has no public way to its coordination
  service's key-value store): no device is involved, and waiting costs no collective.
* `check_shared(directory)`: a marker process 0 writes that every process must find, so a
  work directory on per-host disks is refused before any process writes to it.
* `barrier(name)`: every process waits for the others (at most the timeout).

With one process each is its single-process case. The data needs nothing of its own: every
process loads the same dataset and computes its rows of each global batch (docs/multihost.md).
"""

import atexit
import itertools
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jaxprune.errors import EXIT_STATUS, LOST_PROCESS_STATUS, ConfigError, DataError, as_flags

SETTINGS = ('coordinator_address', 'num_processes', 'process_id')
_agreements = itertools.count()
_timeout_s = 300


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
  """Joins the processes of a multi-process run; call before any other JAX call.

  The three settings come together or not at all (then the cluster must be detectable).
  `timeout_s` bounds joining and every barrier, and is JAX's heartbeat timeout: a process
  silent that long counts as dead. Not all joined within it ends this process with
  'error: SENTENCE' on stderr and exit status 1. Raises ConfigError for inconsistent
  settings, or when no cluster is detected."""
  global _timeout_s
  given = dict(zip(SETTINGS, (coordinator_address, num_processes, process_id)))
  missing = [name for name, value in given.items() if value is None]
  if 0 < len(missing) < len(given):
    raise ConfigError(f'multihost takes {SETTINGS[0]}, {SETTINGS[1]} and {SETTINGS[2]} '
                      'together (or none of them on a TPU VM, SLURM or Open MPI, which detect '
                      f"them); {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                      'missing.', settings=('multihost', *SETTINGS))
  if not missing and process_id >= num_processes:
    raise ConfigError(f'process_id {process_id} is not below num_processes {num_processes}; '
                      'the processes are numbered 0 to num_processes-1.',
                      settings=('process_id', 'num_processes'))
  _timeout_s = timeout_s
  # Gloo lets CPU devices of different processes take part in one collective.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  who = f'process {process_id}' if process_id is not None else 'this process'
  not_joined = ConfigError(
      f'{who} could not join the run at coordinator {coordinator_address or "(detected)"} '
      f'within {timeout_s} s; check that every process got the same coordinator_address '
      "(process 0's HOST:PORT, reachable from every host) and num_processes, and that that "
      'many processes started.', settings=('multihost_timeout', *SETTINGS))
  # JAX ends a process that cannot join (an unreachable coordinator, fewer processes than
  # num_processes) with an abort of its own, no exception, when its timeout expires; this
  # timer ends it 30 s earlier, with the sentence.
  timer = threading.Timer(timeout_s, _exit_with, (not_joined,))
  timer.daemon = True
  timer.start()
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s + 30,
                               heartbeat_timeout_seconds=timeout_s)
  except ValueError as error:
    if missing:
      raise ConfigError('multihost found no TPU VM, SLURM or Open MPI cluster to join; give '
                        f'{SETTINGS[0]}, {SETTINGS[1]} and {SETTINGS[2]}.',
                        settings=('multihost', *SETTINGS)) from error
    raise
  finally:
    timer.cancel()
  logging.info('process %d of %d: %d local of %d devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  if jax.process_count() > 1:
    _hold_lifelines(coordinator_address)


# What a process says on its lifelines when it ends on its own terms (done, a refusal, a
# preemption, even a traceback): the others then stop watching it.
_GOODBYE = 'goodbye'
# The longest "HOST:PORT" of process 0's lifeline listener that fits the broadcast.
_ADDRESS_BYTES = 256

# The other processes' lifeline sockets by process index: every other process on process 0,
# process 0 on the others.
_peers: dict[int, socket.socket] = {}
# What the other processes sent, by (key, sender), until it is received; and the processes
# that said goodbye, which will send nothing more.
_inbox: dict[tuple[str, int], Any] = {}
_gone: set[int] = set()
_arrived = threading.Condition()


def _hold_lifelines(coordinator_address: str | None) -> None:
  """Connects process 0 with every other process by a TCP socket a watcher thread reads: a
  killed process's kernel closes its sockets at once, so the others stop within a second,
  where JAX's heartbeats would tell one outside a collective only `timeout_s` later, with an
  abort and a stack dump. The sockets also carry `agree`, `barrier` and `check_shared`."""
  readers = {}
  if jax.process_index() == 0:
    listener = socket.create_server(('', 0))
    listener.settimeout(_timeout_s)
    # Process 0 is the coordinator, so its address reaches this host from every other; a
    # detected cluster (TPU VM, SLURM) names its hosts, and this is one of them.
    host = coordinator_address.rsplit(':', 1)[0] if coordinator_address else socket.getfqdn()
    _from_process_0(f'{host}:{listener.getsockname()[1]}')
    for _ in range(jax.process_count() - 1):
      peer = listener.accept()[0]
      peer.settimeout(_timeout_s)
      reader = peer.makefile('rb')
      index = int(json.loads(reader.readline())['value'])
      peer.settimeout(None)
      _peers[index], readers[index] = peer, reader
    listener.close()
  else:
    host, port = _from_process_0('').rsplit(':', 1)
    peer = socket.create_connection((host, int(port)), timeout=_timeout_s)
    peer.settimeout(None)
    _peers[0], readers[0] = peer, peer.makefile('rb')
    _send(0, 'index', jax.process_index())
  for index, reader in readers.items():
    threading.Thread(target=_watch, args=(reader, index), daemon=True,
                     name=f'lifeline to process {index}').start()
  atexit.register(_tell_others, _GOODBYE, None)


def _from_process_0(text: str) -> str:
  """Process 0's `text` on every process, through one collective (every process calls it)."""
  encoded = text.encode()
  if len(encoded) > _ADDRESS_BYTES:
    raise ValueError(f'{text!r} is longer than {_ADDRESS_BYTES} bytes.')
  padded = np.frombuffer(encoded.ljust(_ADDRESS_BYTES, b'\0'), np.uint8)
  return bytes(multihost_utils.broadcast_one_to_all(padded)).rstrip(b'\0').decode()


def _send(index: int, key: str, value: Any) -> None:
  """Sends `value` (JSON-able) under `key` to process `index`. A process that is gone cannot
  take it; its lifeline's watcher ends this process with the sentence that says so."""
  try:
    _peers[index].sendall(json.dumps({'key': key, 'value': value}).encode() + b'\n')
  except OSError:
    pass


def _receive(key: str, sender: int, timeout_s: float | None = None) -> Any:
  """What process `sender` sent under `key`, once it has (TimeoutError after `timeout_s`).
  A sender that ended without sending it ends this process too, with one sentence."""
  with _arrived:
    if not _arrived.wait_for(lambda: (key, sender) in _inbox or sender in _gone, timeout_s):
      raise TimeoutError(f'nothing from process {sender} under {key} within {timeout_s} s')
    if (key, sender) in _inbox:
      return _inbox.pop((key, sender))
  print(f'error: process {sender} of this multi-process run ended while this process waited '
        'for it (its output says why); the last checkpoint is kept, and the same command on '
        'every process resumes from it.', file=sys.stderr, flush=True)
  # An orderly exit: at exit JAX's shutdown meets the sender's, which is under way.
  sys.exit(LOST_PROCESS_STATUS)


def _watch(reader, sender: int) -> None:
  """Files every message from process `sender` in the inbox until it says goodbye; ends this
  process with one sentence when its socket closes first (it was killed, or crashed)."""
  try:
    for line in reader:
      message = json.loads(line)
      with _arrived:
        if message['key'] == _GOODBYE:
          _gone.add(sender)
        else:
          _inbox[message['key'], sender] = message['value']
        _arrived.notify_all()
      if sender in _gone:
        return
  except (OSError, ValueError):  # a reset connection, or a message cut short by its death
    pass
  print(f'error: process {sender} of this multi-process run stopped without saying goodbye '
        '(killed, or crashed); the last checkpoint is kept, and the same command on every '
        'process resumes from it.', file=sys.stderr, flush=True)
  os._exit(LOST_PROCESS_STATUS)


def _exit_with(error: ConfigError) -> None:
  print(f'error: {as_flags(error)}', file=sys.stderr, flush=True)
  os._exit(EXIT_STATUS[ConfigError])


def agree(name: str, decide: Callable[[], Any]) -> Any:
  """`decide()` on process 0, its JSON-able value returned on every process; every process
  calls it at the same point of the same program (answers are matched by call order). A
  ConfigError (or DataError) of process 0 is raised on every process; any other exception
  stops process 0 with its traceback, and the others with one sentence naming `name`."""
  if jax.process_count() == 1:
    return decide()
  key = f'agree/{next(_agreements)}/{name}'
  if jax.process_index() == 0:
    try:
      value = decide()
    except ConfigError as error:
      _tell_others(key, {'error': str(error), 'settings': error.settings,
                         'data': isinstance(error, DataError)})
      raise
    except BaseException as error:
      lines = str(error).strip().splitlines()
      _tell_others(key, {'failed': lines[0] if lines else type(error).__name__})
      raise
    _tell_others(key, {'value': value})
    return value
  # Process 0 may take hours (waiting for another run's baseline); its death ends this
  # process through the lifeline.
  answer = _receive(key, 0)
  if 'error' in answer:
    error_type = DataError if answer['data'] else ConfigError
    raise error_type(answer['error'], settings=answer['settings'])
  if 'failed' in answer:
    raise RuntimeError(f'process 0 failed while deciding {name} ({answer["failed"]}); its log '
                       'has the traceback.')
  return answer['value']


def _tell_others(key: str, value: Any) -> None:
  for index in _peers:
    _send(index, key, value)


def _collect(key: str, name: str) -> dict[int, Any]:
  """What every peer sent under `key`, by process index (ConfigError after the timeout)."""
  deadline = time.monotonic() + _timeout_s
  try:
    return {index: _receive(key, index, max(0.0, deadline - time.monotonic()))
            for index in sorted(_peers)}
  except TimeoutError as error:
    raise ConfigError(f'not every process reached {name} within {_timeout_s} s; every process '
                      'must run the same command (the same settings).',
                      settings=('multihost_timeout',)) from error


def barrier(name: str) -> None:
  """Waits until every process reaches `barrier(name)` (ConfigError after the timeout)."""
  if jax.process_count() == 1:
    return
  key = f'barrier/{next(_agreements)}/{name}'
  if jax.process_index() == 0:
    _collect(key, name)
    _tell_others(key, None)
  else:
    _send(0, key, None)
    _collect(key, name)  # process 0's go-ahead


def check_shared(directory: epath.Path, setting: str) -> None:
  """Raises ConfigError on every process unless each sees the marker process 0 writes in
  `directory` (created if absent): a directory on each host's own disk is not one work
  directory, and checkpoints written collectively into it would be torn apart."""
  if jax.process_count() == 1:
    return

  def write_marker():
    marker = directory / f'.multihost-{uuid.uuid4().hex}'
    directory.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    return marker.name

  marker = directory / agree(f'{setting} marker', write_marker)
  key = f'shared/{next(_agreements)}/{setting}'
  if jax.process_index() != 0:
    _send(0, key, marker.exists())

  def blind_processes():
    seen = {0: marker.exists(), **_collect(key, f'the check of {setting}')}
    blind = [i for i, sees in sorted(seen.items()) if not sees]
    marker.unlink()
    if blind:
      raise ConfigError(f'{setting} {directory} is not one directory for every process: '
                        f'process{"es" if len(blind) > 1 else ""} {", ".join(map(str, blind))} '
                        'cannot see the file process 0 wrote there; give every process the same '
                        'storage (a shared file system or gs://).', settings=(setting,))

  agree(f'{setting} is shared', blind_processes)
