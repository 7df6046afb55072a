r"""Runs launch.py as N processes of one multi-process run on this machine, as a pod runs it.

    python -m jaxprune.local_cluster --processes=2 --devices_per_process=1 -- \
        --workdir=runs/quickstart-2p --model=resnet20 --epochs=10 --criterion=taylor

Every process runs `launch.py --multihost` with the coordinator on a free localhost port,
its `--process_id` and the flags after `--`, on `--devices_per_process` CPU devices, so a
pod configuration can be debugged on a laptop. Process 0 writes to this terminal; process i
to LOG_DIR/process<i>.log.

SIGTERM or Ctrl-C to this launcher reaches every process (each in a session of its own) as
SIGTERM, as a TPU maintenance event reaches every worker: they save the same step and exit
with 75 (rerun the same command to resume). When a process fails the others get `--grace_s`
to stop on their own before they are killed. The exit status is process 0's, or the first
failure's when process 0 succeeded.
"""

import argparse
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / 'launch.py'


def free_port() -> int:
  """A TCP port nothing listens on now (the OS picks it)."""
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    return probe.getsockname()[1]


def environment(devices_per_process: int) -> dict:
  """This environment, with JAX on `devices_per_process` CPU devices."""
  xla_flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
               if not f.startswith('--xla_force_host_platform_device_count')]
  xla_flags.append(f'--xla_force_host_platform_device_count={devices_per_process}')
  return {**os.environ, 'XLA_FLAGS': ' '.join(xla_flags), 'JAX_PLATFORMS': 'cpu'}


def run(processes: int, devices_per_process: int, flags, log_dir: pathlib.Path,
        grace_s: float) -> int:
  """Starts the processes, passes signals on, waits for all; returns the exit status."""
  log_dir.mkdir(parents=True, exist_ok=True)
  env = environment(devices_per_process)
  port = free_port()
  logs = [None] + [open(log_dir / f'process{i}.log', 'w') for i in range(1, processes)]
  children = [subprocess.Popen(
      [sys.executable, str(LAUNCH), '--multihost', f'--coordinator_address=localhost:{port}',
       f'--num_processes={processes}', f'--process_id={i}', *flags],
      env=env, stdout=log, stderr=None if log is None else subprocess.STDOUT,
      start_new_session=True) for i, log in enumerate(logs)]

  def forward(signum, frame):
    del signum, frame
    # SIGTERM is what the processes agree on a step to save at; a SIGINT each would stop
    # every one wherever it is. Popen signals no child that has exited.
    for child in children:
      child.send_signal(signal.SIGTERM)

  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, forward)
  first_failure = None
  while any(child.poll() is None for child in children):
    for i, child in enumerate(children):
      if first_failure is None and child.returncode not in (None, 0):
        first_failure = i
        deadline = time.time() + grace_s
    if first_failure is not None and time.time() > deadline:
      for child in children:
        child.kill()
    time.sleep(0.2)
  for log in logs[1:]:
    log.close()
  statuses = [child.returncode for child in children]
  for i, status in enumerate(statuses):
    if status != 0:
      how = (f'was killed by {signal.Signals(-status).name}' if status < 0 else
             f'exited with status {status}')
      where = '' if i == 0 else f' (log: {log_dir / f"process{i}.log"})'
      sys.stderr.write(f'local_cluster: process {i} {how}{where}.\n')
  status = statuses[0] if statuses[0] != 0 or first_failure is None else statuses[first_failure]
  return status if status >= 0 else 128 - status


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m jaxprune.local_cluster', description=__doc__.split('\n\n')[0],
      usage='%(prog)s [--processes=N] [--devices_per_process=K] -- LAUNCH_FLAGS...')
  parser.add_argument('--processes', type=int, default=2, help='processes to start (default 2)')
  parser.add_argument('--devices_per_process', type=int, default=1,
                      help='CPU devices of each process (default 1)')
  parser.add_argument('--log_dir', default=None,
                      help='where processes 1..N-1 write their logs (default: a new temporary '
                           'directory)')
  parser.add_argument('--grace_s', type=float, default=60.0,
                      help='seconds the others get to stop after one fails (default 60)')
  parser.add_argument('flags', nargs='*', help='launch.py flags, after --')
  args = parser.parse_args(argv)
  for name in ('processes', 'devices_per_process'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be at least 1, got {getattr(args, name)}.')
  log_dir = pathlib.Path(args.log_dir or tempfile.mkdtemp(prefix='local_cluster-'))
  if args.processes > 1:
    sys.stderr.write(f'local_cluster: {args.processes} processes x {args.devices_per_process} '
                     f'CPU devices; logs of processes 1-{args.processes - 1} in {log_dir}\n')
  return run(args.processes, args.devices_per_process, args.flags, log_dir, args.grace_s)


if __name__ == '__main__':
  sys.exit(main())
