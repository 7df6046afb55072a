"""Signals: entry points install the handlers, library calls leave a notebook's own; SIGTERM
anywhere in a run exits 75 in one line with the claims released, Ctrl-C 130."""

import json
import multiprocessing
import os
import signal
import subprocess
import threading
import time

import pytest
from etils import epath

from conftest import QUICK_FLAGS, ROOT, launch_command
from jaxprune import data, errors, train
from jaxprune.pipeline import stages, workdir
from jaxprune.train import checkpoint
from test_train import learnable_dataset, tiny

OPTIONS = train.TrainOptions(epochs=1, batch_size=64,
                             optimizer=train.OptimizerConfig(learning_rate=0.05))


def _handlers():
  return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def _sigterm_in(seconds: float) -> threading.Timer:
  timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
  timer.start()
  return timer


def test_fit_from_python_leaves_the_signal_handlers_alone(tmp_path):
  ds = learnable_dataset()
  model, _, variables = tiny()
  before, during = _handlers(), []
  train.fit(model, variables, data.device_put_dataset(ds), ds.spec, OPTIONS, stage_dir=tmp_path,
            callbacks=[lambda state, record: during.append(_handlers())])
  # Whatever the process had (Python's default, or SIG_IGN under nohup) stays.
  assert during == [before] and _handlers() == before


def test_sigterm_outside_training_stops_at_once_in_one_line_and_the_handlers_come_back():
  before = _handlers()
  with pytest.raises(errors.Preempted) as raised, checkpoint.SIGNALS.installed():
    assert _handlers() != before
    _sigterm_in(0.1)
    time.sleep(30)
  assert str(raised.value) == ('preempted: finished stages and the last checkpoint are kept; '
                               'rerun the same command to resume.')
  assert raised.value.step is None and _handlers() == before


def _hold(directory: epath.Path) -> multiprocessing.Process:
  """A live process that holds `directory`'s claim (as another run would)."""
  holder = multiprocessing.get_context('spawn').Process(target=time.sleep, args=(120,))
  holder.start()
  directory.mkdir(parents=True, exist_ok=True)
  (directory / workdir.CLAIM).write_text(json.dumps(
      {'host': os.uname().nodename, 'pid': holder.pid, 'since': time.time(),
       'heartbeat': time.time()}))
  return holder


def test_sigterm_while_waiting_for_a_claim_releases_the_claims_held(tmp_path):
  work, shared = epath.Path(tmp_path / 'work'), epath.Path(tmp_path / 'baseline')
  holder = _hold(shared)
  try:
    with pytest.raises(errors.Preempted), checkpoint.SIGNALS.installed():
      with workdir.claimed(work, wait=False, what='workdir'):
        _sigterm_in(0.5)
        with workdir.claimed(shared, wait=True, what='baseline'):
          pytest.fail('the baseline claim of a live process was taken')
    assert not (work / workdir.CLAIM).exists()
    with workdir.claimed(work, wait=False, what='workdir'):  # A rerun gets it.
      pass
  finally:
    holder.terminate()
    holder.join()


def test_sigterm_during_a_stages_final_writes_finishes_them_then_stops(tmp_path, monkeypatch):
  ds = learnable_dataset()
  model, _, variables = tiny()
  save_variables = checkpoint.save_variables

  def signalled_save(path, tree):
    os.kill(os.getpid(), signal.SIGTERM)
    save_variables(path, tree)

  monkeypatch.setattr(checkpoint, 'save_variables', signalled_save)
  with pytest.raises(errors.Preempted) as raised, checkpoint.SIGNALS.installed():
    stages.train_stage(tmp_path, model, variables, data.device_put_dataset(ds), ds.spec, OPTIONS,
                       seed=0, record={})
  assert str(raised.value) == (f'preempted: step 4 of {tmp_path} is saved; rerun the same '
                               'command to resume.')
  assert checkpoint.is_done(tmp_path)
  checkpoint.load_variables(tmp_path / checkpoint.FINAL)


def _launch(*flags, workdir):
  return subprocess.Popen(launch_command(*flags, workdir=workdir), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path_glob, root, proc, seconds=300):
  deadline = time.time() + seconds
  while not list(root.glob(path_glob)):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.2)


def _assert_one_line_75(proc, starts: str):
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == errors.EXIT_STATUS[errors.Preempted] == 75, stderr[-3000:]
  assert 'Traceback' not in stderr
  assert stderr.strip().splitlines()[-1].startswith(starts)


@pytest.mark.slow  # launch.py runs of about 30 s.
def test_launch_sigterm_while_training_exits_75_with_the_claims_released(tmp_path):
  flags = (*QUICK_FLAGS, '--epochs=3', '--max_train=512', '--regime=scratch')
  proc = _launch(*flags, workdir=tmp_path)
  _wait_for('baseline/checkpoints/*', tmp_path, proc)
  _assert_one_line_75(proc, 'preempted: step ')
  assert not list(tmp_path.rglob(workdir.CLAIM))
  rerun = subprocess.run(launch_command(*flags, workdir=tmp_path), cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-2000:]


@pytest.mark.slow  # launch.py runs of about 30 s.
def test_launch_sigterm_while_waiting_for_a_shared_baseline_exits_75_with_its_claim_released(
    tmp_path):
  shared = epath.Path(tmp_path / 'shared')
  holder = _hold(shared)
  flags = (*QUICK_FLAGS, f'--baseline_dir={shared}', '--regime=scratch')
  try:
    proc = _launch(*flags, workdir=tmp_path / 'work')
    _wait_for(f'work/{workdir.CLAIM}', tmp_path, proc)
    time.sleep(1)  # Past the claim of the work directory, into the wait for the baseline.
    _assert_one_line_75(proc, 'preempted: finished stages and the last checkpoint are kept')
  finally:
    holder.terminate()
    holder.join()
  assert not (tmp_path / 'work' / workdir.CLAIM).exists()
  rerun = subprocess.run(launch_command(*flags, workdir=tmp_path / 'work'), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
