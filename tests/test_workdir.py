"""Work directories a researcher can trust: nothing poisoned by a refused value, claims that
make shared baselines safe, damaged checkpoints recovered, storage failures in one sentence."""

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from etils import epath

from conftest import QUICK, QUICK_FLAGS, ROOT, launch_command
from jaxprune import data, errors, pipeline
from jaxprune.pipeline import config as config_lib
from jaxprune.pipeline import workdir
from jaxprune.train import checkpoint


def _one_line(error) -> str:
  line = errors.as_flags(error) if isinstance(error, errors.ConfigError) else str(error)
  assert '\n' not in line, line
  return line


def _files(root) -> dict:
  return {p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()}


def _truncate_one_file(directory):
  """Halves the largest file under `directory` (as a crash or a full disk leaves it)."""
  target = max((p for p in directory.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  target.write_bytes(target.read_bytes()[:target.stat().st_size // 2])
  return target


# ------------------------------------------------- 1. a refused value leaves nothing behind


@pytest.mark.parametrize('settings, message', [
    ({'epochs': 2, 'prune_ratio': 0.999}, 'removes'),
    ({'selection': 'macs', 'prune_ratio': None, 'target_macs': 0.0001}, 'is below the'),
    ({'batch_size': 5000}, '--batch_size 5000 exceeds the 256 training examples.'),
])
def test_an_infeasible_setting_is_refused_before_anything_is_written(quick_config, tmp_path,
                                                                     settings, message):
  with pytest.raises(errors.ConfigError) as raised:
    pipeline.run(quick_config(**settings))
  assert message in _one_line(raised.value)
  assert not (tmp_path / 'work').exists()


def test_the_corrected_value_runs_where_the_refused_one_was_tried(quick_config, tmp_path):
  with pytest.raises(errors.ConfigError):
    pipeline.run(quick_config(prune_ratio=0.999))
  results = pipeline.run(quick_config(prune_ratio=0.9))
  assert [r['stage'] for r in results['rows']] == ['baseline', 'pruned', 'scratch']


def test_a_stage_that_holds_nothing_computed_takes_new_settings(quick_config, tmp_path):
  # What an earlier version left after refusing --prune_ratio=0.999 once the baseline had
  # trained: prune/ with only its identity.
  config = quick_config()
  pipeline.run(config)
  prune = tmp_path / 'work' / 'prune'
  for path in sorted(prune.rglob('*'), reverse=True):
    path.rmdir() if path.is_dir() else path.unlink()
  stale = config_lib.stage_settings(config_lib.make(**{**QUICK, 'prune_ratio': 0.999}), 'prune')
  (prune / 'stage_config.json').write_text(json.dumps(stale))
  (tmp_path / 'work' / 'scratch').rename(tmp_path / 'old_scratch')
  results = pipeline.run(config)
  assert json.loads((prune / 'stage_config.json').read_text())['prune_ratio'] == 0.5
  assert results['rows'][0]['test_accuracy'] == json.loads(
      (tmp_path / 'work' / 'baseline' / 'result.json').read_text())['test_accuracy']


# ------------------------------------------------------------------ 2. claims


def test_a_workdir_in_use_by_another_process_is_refused_naming_it(quick_config, tmp_path):
  config = quick_config()
  work = epath.Path(tmp_path / 'work')
  holder = multiprocessing.get_context('spawn').Process(target=time.sleep, args=(60,))
  holder.start()
  try:
    work.mkdir()
    (work / workdir.CLAIM).write_text(json.dumps(
        {'host': os.uname().nodename, 'pid': holder.pid, 'since': time.time(),
         'heartbeat': time.time()}))
    with pytest.raises(errors.ConfigError) as raised:
      pipeline.run(config)
  finally:
    holder.terminate()
    holder.join()
  line = _one_line(raised.value)
  assert f'workdir {config.workdir} is in use by process {holder.pid} on ' in line
  assert not (work / 'baseline').exists()


def test_a_claim_of_a_dead_process_is_taken_over(quick_config, tmp_path):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True).stdout.strip()
  work = tmp_path / 'work'
  work.mkdir()
  (work / workdir.CLAIM).write_text(json.dumps(
      {'host': os.uname().nodename, 'pid': int(dead), 'since': time.time(),
       'heartbeat': time.time()}))
  pipeline.run(quick_config())
  assert (work / 'scratch' / 'result.json').exists() and not (work / workdir.CLAIM).exists()


def test_a_claim_is_renewed_while_held_and_a_stale_one_from_another_host_taken_over(
    tmp_path, monkeypatch):
  monkeypatch.setattr(workdir, 'HEARTBEAT_S', 0.05)
  directory = epath.Path(tmp_path / 'stage')
  directory.mkdir()
  (directory / workdir.CLAIM).write_text(json.dumps(
      {'host': 'elsewhere', 'pid': 1, 'since': 0.0, 'heartbeat': time.time() - workdir.STALE_S - 1}))
  with workdir.claimed(directory, wait=False, what='stage'):
    first = json.loads((directory / workdir.CLAIM).read_text())
    time.sleep(0.3)
    renewed = json.loads((directory / workdir.CLAIM).read_text())
  assert first['pid'] == renewed['pid'] == os.getpid()
  assert renewed['heartbeat'] > first['heartbeat']
  assert not (directory / workdir.CLAIM).exists()


def test_a_run_waits_for_the_process_training_its_shared_baseline(quick_config, tmp_path,
                                                                  monkeypatch):
  monkeypatch.setattr(workdir, 'WAIT_POLL_S', 0.1)
  shared = epath.Path(tmp_path / 'shared')
  released = []

  def hold_for_a_while():
    with workdir.claimed(shared, wait=False, what='baseline'):
      time.sleep(2)
      released.append(time.time())

  holder = threading.Thread(target=hold_for_a_while)
  holder.start()
  time.sleep(0.5)
  start = time.time()
  pipeline.run(quick_config(baseline_dir=str(shared)))
  holder.join()
  assert released and released[0] >= start
  assert (shared / 'result.json').exists()


@pytest.mark.slow
def test_two_runs_sharing_a_baseline_started_2s_apart_train_it_once(tmp_path):
  flags = (*QUICK_FLAGS, '--epochs=4', '--max_train=1024', f'--baseline_dir={tmp_path / "B"}')
  first = subprocess.Popen(launch_command(*flags, '--criterion=taylor', workdir=tmp_path / 'W1'),
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(2)
  second = subprocess.run(launch_command(*flags, '--criterion=random', workdir=tmp_path / 'W2'),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  _, first_err = first.communicate(timeout=600)
  assert first.returncode == 0, first_err[-2000:]
  assert second.returncode == 0, second.stderr[-2000:]
  assert 'Waiting for baseline' in second.stderr
  # The baseline trained in the first process only: its epochs appear once, in its log.
  assert first_err.count('Stage baseline: ') == 1 and 'epoch 4/4' in first_err
  assert 'done; using the saved results' in second.stderr
  baseline = json.loads((tmp_path / 'B' / 'result.json').read_text())
  for work in ('W1', 'W2'):
    rows = json.loads((tmp_path / work / 'results.json').read_text())['rows']
    assert rows[0]['test_accuracy'] == baseline['test_accuracy']


@pytest.mark.slow
def test_a_second_process_on_the_same_workdir_is_refused_and_the_first_finishes(tmp_path):
  flags = (*QUICK_FLAGS, '--epochs=4', '--max_train=1024')
  first = subprocess.Popen(launch_command(*flags, workdir=tmp_path / 'W'), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(2)
  second = subprocess.run(launch_command(*flags, workdir=tmp_path / 'W'), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  _, first_err = first.communicate(timeout=600)
  assert first.returncode == 0, first_err[-2000:]
  assert second.returncode == 1 and 'Traceback' not in second.stderr
  assert second.stderr.strip().splitlines()[-1].startswith(
      f'error: --workdir {tmp_path / "W"} is in use by process {first.pid} on ')


# ------------------------------------------------- 3. damaged checkpoints


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(quick_config, tmp_path):
  config = quick_config(epochs=3, regime='scratch')
  expected = pipeline.run(config)
  stage = tmp_path / 'work' / 'scratch'
  steps = sorted(int(p.name) for p in (stage / 'checkpoints').iterdir() if p.name.isdigit())
  assert len(steps) == 2
  (stage / 'result.json').unlink()
  _truncate_one_file(stage / 'checkpoints' / str(steps[-1]))
  again = pipeline.run(config)
  assert again['rows'] == expected['rows'][:2] + [
      {**expected['rows'][2], 'wall_time_s': again['rows'][2]['wall_time_s']}]
  assert (stage / checkpoint.CORRUPT / str(steps[-1])).exists()


def test_a_damaged_final_is_rebuilt_from_the_last_checkpoint(quick_config, tmp_path):
  config = quick_config(regime='scratch')
  expected = pipeline.run(config)
  stage = tmp_path / 'work' / 'scratch'
  _truncate_one_file(stage / 'final')
  again = pipeline.run(config)
  assert again['rows'][2]['test_accuracy'] == expected['rows'][2]['test_accuracy']
  checkpoint.load_variables(stage / 'final')  # restores again


def test_no_checkpoint_that_restores_is_one_sentence_naming_stage_and_file(quick_config,
                                                                           tmp_path):
  config = quick_config(epochs=2, regime='scratch')
  pipeline.run(config)
  stage = tmp_path / 'work' / 'scratch'
  (stage / 'result.json').unlink()
  for step in (stage / 'checkpoints').iterdir():
    if step.name.isdigit():
      _truncate_one_file(step)
  with pytest.raises(errors.DataError) as raised:
    pipeline.run(config)
  line = _one_line(raised.value)
  assert f'no checkpoint of stage {stage} restores: {stage}/checkpoints/' in line
  assert 'a rerun trains the stage again' in line


# ------------------------------------------------- 4. baseline_dir is a baseline stage


def test_another_runs_workdir_as_baseline_dir_is_refused_untouched(quick_config, tmp_path):
  pipeline.run(quick_config())
  before = _files(tmp_path)
  with pytest.raises(errors.ConfigError) as raised:
    pipeline.run(quick_config(workdir=str(tmp_path / 'other'),
                              baseline_dir=str(tmp_path / 'work')))
  assert 'is the work directory of another run; its baseline stage is' in _one_line(raised.value)
  assert _files(tmp_path) == before and not (tmp_path / 'other').exists()


def test_a_regime_stage_as_baseline_dir_is_refused_untouched(quick_config, tmp_path):
  pipeline.run(quick_config())
  before = _files(tmp_path)
  with pytest.raises(errors.ConfigError) as raised:
    pipeline.run(quick_config(workdir=str(tmp_path / 'other'),
                              baseline_dir=str(tmp_path / 'work' / 'scratch')))
  assert 'is a prune or regime stage' in _one_line(raised.value)
  assert _files(tmp_path) == before


def test_a_directory_of_other_files_as_baseline_dir_is_refused(quick_config, tmp_path):
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
  with pytest.raises(errors.ConfigError) as raised:
    pipeline.run(quick_config(baseline_dir=str(tmp_path / 'mine')))
  assert 'holds other files (notes.txt, ...)' in _one_line(raised.value)
  assert sorted(p.name for p in (tmp_path / 'mine').iterdir()) == ['notes.txt']


# ------------------------------------------------- 5. one sentence, not a traceback


def test_a_binary_flagfile_is_one_sentence(tmp_path, launch):
  flagfile = tmp_path / 'bad.flags'
  flagfile.write_bytes(bytes(range(128, 256)))
  run = launch(f'--flagfile={flagfile}', workdir=tmp_path / 'work')
  assert run.returncode == 1 and 'Traceback' not in run.stderr
  assert run.stderr.strip() == (f'error: --flagfile {flagfile} is not a text file of flags '
                                '(byte 0 is not UTF-8).')


def _npz(path, n_train=64, shape=(8, 8, 3), labels=None):
  rng = np.random.default_rng(0)
  train_labels = np.arange(n_train) % 4 if labels is None else labels
  np.savez(path, train_images=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
           train_labels=train_labels, test_images=np.zeros((8, *shape), np.uint8),
           test_labels=np.arange(8) % 4)
  return path


@pytest.mark.parametrize('damage, message', [
    (lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]), 'is damaged (truncated'),
    (lambda p: p.write_bytes(b'PK\x03\x04' + bytes(200)), 'is damaged'),
    (lambda p: p.write_text('train_images,train_labels\n1,2\n'), 'is not an npz archive'),
], ids=['truncated', 'corrupted', 'text'])
def test_an_unreadable_npz_is_one_sentence(tmp_path, damage, message):
  path = _npz(tmp_path / 'data.npz')
  damage(path)
  with pytest.raises(errors.DataError) as raised:
    data.load('npz', data_path=str(path))
  line = _one_line(raised.value)
  assert message in line and str(path) in line


def test_a_workdir_that_is_a_file_or_under_one_is_refused(quick_config, tmp_path):
  (tmp_path / 'file').write_text('')
  for path, message in ((tmp_path / 'file', 'is a file'),
                        (tmp_path / 'file' / 'run', f"lies under '{tmp_path / 'file'}'")):
    with pytest.raises(errors.ConfigError) as raised:
      pipeline.run(quick_config(workdir=str(path)))
    assert f"--workdir '{path}' {message}" in _one_line(raised.value)


def test_an_empty_workdir_is_refused(quick_config):
  with pytest.raises(errors.ConfigError) as raised:
    pipeline.run(quick_config(workdir=''))
  assert _one_line(raised.value) == '--workdir is empty; give a directory (a local path or gs://...).'


@pytest.fixture
def tmpfs(tmp_path):
  """tmpfs(size): a fresh tmpfs of `size` mounted under tmp_path (needs root; else skip)."""
  mounted = []

  def mount(size, name='mnt'):
    point = tmp_path / name
    point.mkdir()
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(point)],
                          capture_output=True)
    if done.returncode:
      pytest.skip('mounting a tmpfs (to fill or write-protect storage) needs root')
    mounted.append(point)
    return point

  yield mount
  for point in mounted:
    subprocess.run(['umount', '-l', str(point)], check=False)


def test_a_finished_run_on_read_only_storage_prints_its_table(tmpfs, launch):
  storage = tmpfs('16M')
  first = launch(*QUICK_FLAGS, workdir=storage / 'work')
  assert first.returncode == 0, first.stderr[-2000:]
  subprocess.run(['mount', '-o', 'remount,ro', str(storage)], check=True)
  again = launch(*QUICK_FLAGS, workdir=storage / 'work')
  assert again.returncode == 0, again.stderr[-2000:]
  assert first.stdout == again.stdout and 'scratch' in again.stdout
  assert 'Traceback' not in again.stderr


def test_a_full_disk_is_one_sentence_naming_the_path(tmpfs, launch):
  storage = tmpfs('200k')
  run = launch(*QUICK_FLAGS, workdir=storage / 'run')
  assert run.returncode == 1 and 'Traceback' not in run.stderr, run.stderr[-3000:]
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: cannot write {storage / "run"}/') and last.endswith(
      ': No space left on device.'), last


@pytest.mark.parametrize('flag', ['out', 'archive'])
def test_report_to_an_unwritable_out_or_archive_is_one_sentence(tmp_path, flag):
  from experiments import report
  (tmp_path / 'root' / 'w').mkdir(parents=True)
  (tmp_path / 'root' / 'w' / 'agreement.json').write_text('{}')
  (tmp_path / 'file').write_text('')
  bad = tmp_path / 'file' / 'sub'
  paths = {'out': tmp_path / 'tables', 'archive': tmp_path / 'kept', flag: bad}
  with pytest.raises(SystemExit) as raised:
    report.main(['--root', str(tmp_path / 'root')] + [f'--{k}={v}' for k, v in paths.items()])
  what = {'out': 'write the tables to', 'archive': 'copy the results to'}[flag]
  assert str(raised.value).startswith(f"error: cannot {what} --{flag} '{bad}': ")


def test_an_npz_replaced_by_other_data_is_another_baseline(quick_config, tmp_path):
  path = _npz(tmp_path / 'data.npz')
  config = quick_config(dataset='npz', data_path=str(path), max_train=None, batch_size=16)
  pipeline.run(config)
  _npz(path, shape=(10, 10, 3))
  with pytest.raises(errors.ConfigError) as raised:
    pipeline.run(config)
  assert 'was trained on other data' in _one_line(raised.value)


# ------------------------------------------------- 6. results gather every finished regime


def test_results_gather_every_regime_finished_in_the_workdir(quick_config, tmp_path):
  pipeline.run(quick_config(regime='scratch'))
  results = pipeline.run(quick_config(regime='finetune'))
  assert [r['stage'] for r in results['rows']] == ['baseline', 'pruned', 'finetune', 'scratch']
  stored = json.loads((tmp_path / 'work' / 'results.json').read_text())
  assert [r['stage'] for r in stored['rows']] == ['baseline', 'pruned', 'finetune', 'scratch']


# ------------------------------------------------- 7. stray labels


def test_a_stray_label_is_refused_rather_than_a_new_class(tmp_path):
  labels = np.arange(2000) % 10
  labels[3] = 10
  with pytest.raises(errors.DataError) as raised:
    data.load('npz', data_path=str(_npz(tmp_path / 'data.npz', n_train=2000, labels=labels)))
  line = _one_line(raised.value)
  assert 'label 10 occurs 1 time(s) against 182 per class on average' in line
  assert line.endswith('if it is right, store num_classes=11 in the npz.')


# ------------------------------------------------- 8. the README's two commands


def test_the_readmes_two_commands_get_their_own_workdirs_and_share_the_baseline(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  taylor = pipeline.make(**QUICK, criterion='taylor', regime='scratch')
  random = pipeline.make(**QUICK, criterion='random', regime='scratch')
  assert taylor.workdir != random.workdir and taylor.baseline_dir == random.baseline_dir
  assert taylor.workdir.startswith('runs/tiny-digits/taylor-global_l2-')
  first = pipeline.run(taylor)
  second = pipeline.run(random)
  assert first['rows'][0] == second['rows'][0]
  assert len(list((tmp_path / 'runs' / 'tiny-digits').glob('baseline-*'))) == 1


# ------------------------------------------------- 9. paths and provenance


@pytest.mark.parametrize('case', ['loop', 'dangling', 'proc', 'line break'])
def test_a_workdir_that_cannot_hold_a_run_is_one_sentence(quick_config, tmp_path, case):
  if case == 'loop':
    os.symlink(tmp_path / 'loop', tmp_path / 'loop')
    path = tmp_path / 'loop' / 'run'
    message = (f"--workdir '{path}' lies under '{tmp_path / 'loop'}', which is a loop of "
               'symbolic links; give a directory that resolves.')
  elif case == 'dangling':
    os.symlink(tmp_path / 'unmounted', tmp_path / 'link')
    path = tmp_path / 'link'
    message = (f"--workdir '{path}' is a symbolic link to '{tmp_path / 'unmounted'}', which "
               'does not exist; create that directory or give another one.')
  elif case == 'proc':
    path = '/proc/jaxprune-run'
    message = ("--workdir /proc/jaxprune-run cannot hold a run's files (creating "
               '/proc/jaxprune-run fails: No such file or directory); give a directory on '
               'writable storage.')
  else:
    path = tmp_path / 'runs\nnew'
    message = (f'--workdir {str(path)!r} holds a line break, which launch.flags cannot store; '
               'give a name without one.')
  before = sorted(tmp_path.iterdir())
  with pytest.raises(errors.ConfigError) as raised:
    pipeline.run(quick_config(workdir=str(path)))
  assert _one_line(raised.value) == message
  assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize('inside', ['baseline', 'scratch', 'scratch/more'])
def test_a_workdir_inside_another_runs_stage_is_refused(quick_config, tmp_path, inside):
  pipeline.run(quick_config())
  before = _files(tmp_path)
  nested = tmp_path / 'work' / inside
  with pytest.raises(errors.ConfigError) as raised:
    pipeline.run(quick_config(workdir=str(nested)))
  stage = tmp_path / 'work' / inside.split('/')[0]
  where = 'is' if nested == stage else f'lies under {str(stage)!r}, which is'
  assert _one_line(raised.value) == (
      f"--workdir {str(nested)!r} {where} a stage directory of another run (it holds "
      "stage_config.json); give a directory outside every run's stages.")
  assert _files(tmp_path) == before and not (tmp_path / 'work' / 'scratch' / 'more').exists()


def test_launch_flags_rerun_a_workdir_named_with_a_trailing_space_equals_and_hash(quick_config,
                                                                                  tmp_path):
  from absl import flags
  config = quick_config(workdir=str(tmp_path / 'lr=0.1 #2 '))
  pipeline.run(config)
  done = tmp_path / 'lr=0.1 #2 ' / 'scratch' / 'result.json'
  stamp = done.stat().st_mtime_ns
  parsed = flags.FlagValues()
  config_lib.define_flags(parsed)
  parsed(['launch.py', f"--flagfile={tmp_path / 'lr=0.1 #2 ' / 'launch.flags'}"])
  again = config_lib.from_flags(parsed)
  assert os.path.abspath(again.workdir) == os.path.abspath(config.workdir)
  assert {s: config_lib.stage_settings(again, s) for s in ('baseline', 'prune', 'scratch')} == {
      s: config_lib.stage_settings(config, s) for s in ('baseline', 'prune', 'scratch')}
  pipeline.run(again)
  assert done.stat().st_mtime_ns == stamp
  assert sorted(p.name for p in tmp_path.iterdir()) == ['lr=0.1 #2 ']


def test_results_record_per_row_the_regime_settings_that_made_it(quick_config, tmp_path):
  pipeline.run(quick_config(regime='finetune'))
  pipeline.run(quick_config(regime='lottery'))
  results = pipeline.run(quick_config(regime='scratch', finetune_epochs=5, lottery_style='mask'))
  stored = json.loads((tmp_path / 'work' / 'results.json').read_text())
  assert stored['config']['finetune_epochs'] == 5 and stored['config']['lottery_style'] == 'mask'
  for rows in (results['rows'], stored['rows']):
    settings = {r['stage']: r.get('settings') for r in rows}
    assert settings == {'baseline': None, 'pruned': None, 'scratch': {},
                        'finetune': {'finetune_epochs': 1, 'finetune_lr': 0.001},
                        'lottery': {'lottery_style': 'slice'}}


def _claim_of(directory, host, heartbeat):
  # Written aside and renamed, as the holder's heartbeat is: never read half-written.
  text = json.dumps({'host': host, 'pid': 1, 'since': heartbeat, 'heartbeat': heartbeat})
  (directory / 'claim.tmp').write_text(text)
  (directory / 'claim.tmp').replace(directory / workdir.CLAIM)


def test_a_claim_from_a_clock_ahead_is_skew_aged_from_now_and_taken_over(tmp_path, monkeypatch,
                                                                        caplog):
  monkeypatch.setattr(workdir, 'STALE_S', 0.5)
  monkeypatch.setattr(workdir, 'WAIT_POLL_S', 0.05)
  directory = epath.Path(tmp_path / 'work')
  directory.mkdir()
  _claim_of(directory, 'elsewhere', time.time() + 86400)
  start = time.time()
  with workdir.claimed(directory, wait=False, what=f'workdir {directory}'):
    assert json.loads((directory / workdir.CLAIM).read_text())['pid'] == os.getpid()
  assert workdir.STALE_S <= time.time() - start < 60
  [skew] = [r.getMessage() for r in caplog.records if 'skewed' in r.getMessage()]
  assert skew.startswith(f'workdir {directory} is claimed by process 1 on elsewhere (since ')
  assert "s ahead of this host's clock: the clock of elsewhere is skewed" in skew
  assert 'which is gone; taking it over' in caplog.text


def test_a_renewed_claim_from_a_clock_ahead_is_refused_saying_so(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir, 'WAIT_POLL_S', 0.05)
  directory = epath.Path(tmp_path / 'work')
  directory.mkdir()
  stop = threading.Event()

  def renew():
    while not stop.is_set():
      _claim_of(directory, 'elsewhere', time.time() + 86400)
      time.sleep(0.05)

  holder = threading.Thread(target=renew)
  holder.start()
  try:
    time.sleep(0.1)
    with pytest.raises(errors.ConfigError) as raised:
      with workdir.claimed(directory, wait=False, what=f'workdir {directory}',
                           settings=('workdir',)):
        pass
  finally:
    stop.set()
    holder.join()
  line = _one_line(raised.value)
  assert line.startswith(f'--workdir {directory} is in use by process 1 on elsewhere (since ')
  assert "(its clock runs 8640" in line and "s ahead of this host's); wait for that run" in line
