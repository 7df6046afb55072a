"""launch.py as several processes of one run (`jaxprune.local_cluster`): a pod on this machine.

The default tests are the configuration mistakes a new pod user makes, each one sentence
within seconds; the slow ones run the pipeline as 2 processes, equal to one process,
preempted and resumed, and with one process killed.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import QUICK_FLAGS, ROOT, launch_command
from jaxprune import errors, local_cluster, multihost
from jaxprune.train import checkpoint

# Seconds a process waits for the others: short, so a mistake shows within the test.
TIMEOUT_FLAG = '--multihost_timeout=8'
# Long enough a baseline (8 epochs of 16 steps) to be signalled in the middle.
LONG_FLAGS = ('--model=tiny', '--epochs=8', '--batch_size=32', '--max_train=512',
              '--regime=finetune', '--finetune_epochs=1', '--multihost_timeout=30')
# The 2-process job against one process on as many devices (the same mesh, so the same
# reductions): equal up to float rounding. Against one device the sums run in another
# order, and training at lr 0.1 amplifies that rounding (docs/multihost.md).
ATOL = 1e-6


def cluster_command(*flags, workdir, processes=2, devices=1, log_dir, grace_s=120):
  return [sys.executable, '-m', 'jaxprune.local_cluster', f'--processes={processes}',
          f'--devices_per_process={devices}', f'--log_dir={log_dir}', f'--grace_s={grace_s}',
          '--', f'--workdir={workdir}', '--compilation_cache_dir=', *flags]


def run_cluster(*flags, workdir, log_dir, **kwargs):
  return subprocess.run(cluster_command(*flags, workdir=workdir, log_dir=log_dir, **kwargs),
                        capture_output=True, text=True, cwd=ROOT, timeout=900)


def last_line(text: str) -> str:
  return text.strip().splitlines()[-1]


def accuracies(workdir: pathlib.Path) -> dict:
  rows = json.loads((workdir / 'results.json').read_text())['rows']
  return {row['stage']: row['test_accuracy'] for row in rows}


# ----------------------------------------------------------------------------- mistakes


def test_some_but_not_all_cluster_settings_are_one_sentence():
  with pytest.raises(errors.ConfigError) as error:
    multihost.initialize(num_processes=2)
  assert errors.as_flags(error.value) == (
      '--multihost takes --coordinator_address, --num_processes and --process_id together (or '
      'none of them on a TPU VM, SLURM or Open MPI, which detect them); --coordinator_address '
      'and --process_id are missing.')


def test_a_process_id_beyond_the_process_count_is_one_sentence():
  with pytest.raises(errors.ConfigError) as error:
    multihost.initialize('localhost:1', num_processes=2, process_id=2)
  assert errors.as_flags(error.value) == ('--process_id 2 is not below --num_processes 2; the '
                                          'processes are numbered 0 to num_processes-1.')


def test_cluster_settings_without_multihost_are_one_sentence(tmp_path, launch):
  run = launch(*QUICK_FLAGS, '--num_processes=2', workdir=tmp_path / 'w')
  assert run.returncode == 1
  assert last_line(run.stderr) == ('error: --coordinator_address, --num_processes and '
                                   '--process_id are settings of a multi-process run; add '
                                   '--multihost.')


def test_an_unreachable_coordinator_is_one_sentence_after_the_timeout(tmp_path, launch):
  port = local_cluster.free_port()
  start = time.time()
  run = launch(*QUICK_FLAGS, '--multihost', f'--coordinator_address=localhost:{port}',
               '--num_processes=2', '--process_id=1', TIMEOUT_FLAG, workdir=tmp_path / 'w')
  assert run.returncode == 1 and 'Traceback' not in run.stderr, run.stderr[-3000:]
  assert last_line(run.stderr).startswith(
      f'error: process 1 could not join the run at coordinator localhost:{port} within 8 s; '
      'check that every process got the same --coordinator_address')
  assert time.time() - start < 60
  assert not (tmp_path / 'w').exists()


def test_a_wrong_process_count_is_one_sentence_on_every_process(tmp_path):
  # Two processes started, each told the run has three (a later flag wins).
  run = run_cluster(*QUICK_FLAGS, '--num_processes=3', TIMEOUT_FLAG, workdir=tmp_path / 'w',
                    log_dir=tmp_path / 'logs')
  assert run.returncode == 1, run.stderr[-3000:]
  process1 = (tmp_path / 'logs' / 'process1.log').read_text()
  for out in (run.stderr, process1):
    assert 'Traceback' not in out
    assert any(line.startswith('error: process ') and 'could not join the run at coordinator '
               'localhost:' in line and 'within 8 s' in line for line in out.splitlines()), out


def test_a_work_directory_not_every_process_sees_is_one_sentence(tmp_path):
  # Per-host disks: each process's --workdir is a different directory.
  port = local_cluster.free_port()
  env = local_cluster.environment(1)
  procs = [subprocess.Popen(
      launch_command(*QUICK_FLAGS, '--multihost', f'--coordinator_address=localhost:{port}',
                     '--num_processes=2', f'--process_id={i}', TIMEOUT_FLAG,
                     workdir=tmp_path / f'host{i}'),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
      for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  expected = (f"error: --workdir {tmp_path / 'host0'} is not one directory for every process: "
              'process 1 cannot see the file process 0 wrote there; give every process the '
              'same storage (a shared file system or gs://).')
  for proc, (_, stderr) in zip(procs, outputs):
    assert proc.returncode == 1 and 'Traceback' not in stderr, stderr[-3000:]
    assert last_line(stderr) == expected
  assert list((tmp_path / 'host0').iterdir()) == []


# Two processes joined by `multihost.initialize`: they agree on values, meet at a barrier,
# share a refusal of process 0, and then process 0 stops before answering the next question.
_EXCHANGE = """
import sys
from jaxprune import errors, multihost
port, index = sys.argv[1], int(sys.argv[2])
multihost.initialize(f'localhost:{port}', 2, index, timeout_s=30)
print('agreed', [multihost.agree(f'value {i}', lambda: [i, 'from process 0']) for i in range(3)])
multihost.barrier('the middle')
try:
  multihost.agree('a refusal', lambda: multihost.agree.bad_setting)
except AttributeError:
  print('process 0 failed')
except RuntimeError as error:
  print(error)
with errors.exit_on_user_error():
  if index == 0:
    raise errors.ConfigError('process 0 refuses to answer.')
  multihost.agree('the unanswered question', lambda: 0)
"""


def test_processes_agree_meet_and_stop_when_process_0_ends_without_answering():
  port = local_cluster.free_port()
  procs = [subprocess.Popen([sys.executable, '-c', _EXCHANGE, str(port), str(i)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=local_cluster.environment(1)) for i in range(2)]
  (out0, err0), (out1, err1) = [p.communicate(timeout=120) for p in procs]
  agreed = "agreed [[0, 'from process 0'], [1, 'from process 0'], [2, 'from process 0']]"
  assert agreed in out0.splitlines() and agreed in out1.splitlines(), (err0[-2000:], err1[-2000:])
  assert 'process 0 failed' in out0.splitlines()
  assert ('process 0 failed while deciding a refusal (\'function\' object has no attribute '
          "'bad_setting'); its log has the traceback.") in out1.splitlines()
  assert procs[0].returncode == 1
  assert last_line(err0) == 'error: process 0 refuses to answer.'
  assert procs[1].returncode == errors.LOST_PROCESS_STATUS, err1[-2000:]
  assert last_line(err1) == ('error: process 0 of this multi-process run ended while this '
                             'process waited for it (its output says why); the last checkpoint '
                             'is kept, and the same command on every process resumes from it.')
  assert 'Traceback' not in err1


def test_records_are_written_by_process_0_only(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  stage = tmp_path / 'stage'
  checkpoint.write_metrics(stage, [{'epoch': 1, 'test_accuracy': 0.5}])
  checkpoint.mark_diverged(stage, epoch=1, step=2, resume_step=0, learning_rate=0.1)
  checkpoint.mark_done(stage, {'test_accuracy': 0.5})
  checkpoint.write_text(stage / 'record.json', '{}')
  assert not stage.exists()


# ----------------------------------------------------------------------------- the job


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """LONG_FLAGS run once as 2 processes of 1 device and once as 1 process of 2 devices:
  (their work directories, their outputs)."""
  root = tmp_path_factory.mktemp('uninterrupted')
  two = run_cluster(*LONG_FLAGS, workdir=root / 'two', log_dir=root / 'logs')
  assert two.returncode == 0, two.stderr[-3000:]
  one = subprocess.run(launch_command(*LONG_FLAGS, workdir=root / 'one'), capture_output=True,
                       text=True, cwd=ROOT, timeout=900, env=local_cluster.environment(2))
  assert one.returncode == 0, one.stderr[-3000:]
  return root / 'two', root / 'one', two.stdout, one.stdout


def table_without_times(stdout: str) -> list[str]:
  """The rows of the printed table without their wall-time column (gloo prints its own
  lines to stdout too)."""
  return [line.rsplit(None, 1)[0] for line in stdout.splitlines()
          if line.split(' ', 1)[0] in ('baseline', 'pruned', 'finetune')]


@pytest.mark.slow
def test_two_processes_print_the_single_process_table(uninterrupted):
  two, one, two_stdout, one_stdout = uninterrupted
  np.testing.assert_allclose(list(accuracies(two).values()), list(accuracies(one).values()),
                             atol=ATOL)
  assert table_without_times(two_stdout) == table_without_times(one_stdout)
  # The same batches in the same order: every epoch's training loss agrees.
  losses = [[r['train_loss'] for r in checkpoint.read_metrics(w / 'baseline')]
            for w in (two, one)]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


@pytest.mark.slow
def test_the_checkpoint_directory_holds_one_whole_checkpoint_per_saved_step(uninterrupted):
  two, one = uninterrupted[:2]
  steps = sorted(int(p.name) for p in (two / 'baseline' / 'checkpoints').iterdir())
  assert steps == [112, 128]  # epochs 7 and 8 of 16 steps; two kept
  for step in steps:
    directory = two / 'baseline' / 'checkpoints' / str(step)
    # Finalised (orbax writes this last), and nothing left of an unfinished write.
    assert (directory / '_CHECKPOINT_METADATA').exists()
    assert not any('tmp' in p.name for p in directory.rglob('*'))
    restored = restore_here(directory / 'state')
    alone = restore_here(one / 'baseline' / 'checkpoints' / str(step) / 'state')
    assert int(np.asarray(restored['train']['step'])) == step
    for a, b in zip(*(jax.tree.leaves(t['train']['params']) for t in (restored, alone))):
      np.testing.assert_allclose(a, b, atol=ATOL)


def restore_here(path: pathlib.Path):
  """A checkpoint saved over several devices, restored onto this process's first one."""
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        getattr(metadata, 'item_metadata', metadata))
  return checkpointer.restore(path, target)


@pytest.mark.slow
def test_only_one_process_writes_tensorboard_events(uninterrupted):
  two = uninterrupted[0]
  for stage in ('baseline', 'finetune'):
    events = list((two / stage / checkpoint.TENSORBOARD).iterdir())
    assert len(events) == 1, events


def wait_for_epoch(workdir: pathlib.Path, proc: subprocess.Popen) -> None:
  """Returns once the baseline has recorded its first epoch."""
  metrics = workdir / 'baseline' / checkpoint.METRICS
  deadline = time.time() + 600
  while not (metrics.exists() and metrics.read_text().strip()):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.05)


def wait_for_checkpoint(workdir: pathlib.Path, proc: subprocess.Popen) -> int:
  """The step of the baseline's first finished checkpoint, once there is one (orbax
  renames a checkpoint's directory to its bare step number when it is complete)."""
  checkpoints = workdir / 'baseline' / 'checkpoints'
  deadline = time.time() + 600
  while not (checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  return min(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def preempted_step(text: str) -> int:
  [line] = [l for l in text.splitlines() if l.startswith('preempted: step ')]
  return int(line.split()[2])


@pytest.mark.slow
@pytest.mark.parametrize('signalled', ['every process', 'process 1 only'])
def test_sigterm_saves_one_step_on_every_process_and_the_rerun_resumes_it(tmp_path, signalled,
                                                                          uninterrupted):
  workdir, logs = tmp_path / 'w', tmp_path / 'logs'
  command = cluster_command(*LONG_FLAGS, workdir=workdir, log_dir=logs)
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT)
  wait_for_epoch(workdir, proc)
  if signalled == 'every process':
    proc.send_signal(signal.SIGTERM)  # the launcher passes it on to both
  else:
    # JAX's coordination service tells process 0, and both stop at the same step.
    os.kill(process_pid(workdir, 1), signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 75, stderr[-3000:]
  process1 = (logs / 'process1.log').read_text()
  step = preempted_step(stderr)
  assert preempted_step(process1) == step and 16 <= step < 128
  assert (f'preempted: step {step} of {workdir / "baseline"} is saved; rerun the same command '
          'to resume.') in stderr.splitlines()
  assert step in [int(p.name) for p in (workdir / 'baseline' / 'checkpoints').iterdir()]
  rerun = run_cluster(*LONG_FLAGS, workdir=workdir, log_dir=logs)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  resumed = f'Resuming {workdir / "baseline"} from step {step}.'
  assert resumed in rerun.stderr and resumed in (logs / 'process1.log').read_text()
  assert accuracies(workdir) == accuracies(uninterrupted[0])


def process_pid(workdir: pathlib.Path, process_id: int) -> int:
  """The pid of the launch.py process with `--process_id` of the run in `workdir`."""
  wanted = {f'--workdir={workdir}', f'--process_id={process_id}'}
  for entry in pathlib.Path('/proc').iterdir():
    if entry.name.isdigit():
      try:
        args = set((entry / 'cmdline').read_bytes().decode().split('\0'))
      except OSError:
        continue
      if wanted <= args and any(a.endswith('launch.py') for a in args):
        return int(entry.name)
  raise AssertionError(f'no process {process_id} of {workdir}')


# A process of two that dies closes its lifeline socket; the other notices at once.
LOST_WITHIN_S = 10


@pytest.mark.slow
def test_sigkill_of_one_process_stops_the_other_with_one_sentence_and_the_rerun_resumes(
    tmp_path, uninterrupted):
  workdir, logs = tmp_path / 'w', tmp_path / 'logs'
  proc = subprocess.Popen(cluster_command(*LONG_FLAGS, workdir=workdir, log_dir=logs),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  saved = wait_for_checkpoint(workdir, proc)
  os.kill(process_pid(workdir, 1), signal.SIGKILL)
  killed = time.time()
  _, stderr = proc.communicate(timeout=300)
  assert time.time() - killed < LOST_WITHIN_S
  lines = stderr.strip().splitlines()
  assert lines[-2:] == ['local_cluster: process 0 exited with status 75.',
                        'local_cluster: process 1 was killed by SIGKILL '
                        f'(log: {logs / "process1.log"}).']
  assert lines[-3] == ('error: process 1 of this multi-process run stopped without saying '
                       'goodbye (killed, or crashed); the last checkpoint is kept, and the same '
                       'command on every process resumes from it.')
  assert 'Traceback' not in stderr
  rerun = run_cluster(*LONG_FLAGS, workdir=workdir, log_dir=logs)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  [resumed] = [line for line in rerun.stderr.splitlines()
               if f'Resuming {workdir / "baseline"} from step ' in line]
  assert int(resumed.rsplit(' ', 1)[1].rstrip('.')) >= saved
  assert accuracies(workdir) == accuracies(uninterrupted[0])
