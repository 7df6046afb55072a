"""Work directories on Google Cloud Storage, against a GCS emulator on localhost
(`gcs_emulator`): the quick start with its baseline and compilation cache on gs://, claims
that exactly one of many concurrent claimants holds, and a bucket that cannot be used
refused in one sentence within seconds. Slow: kill -9 and rerun, two runs sharing a
baseline, two processes of one run, a damaged checkpoint object."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import QUICK_FLAGS, ROOT, launch_command
from gcs_emulator import Emulator
from jaxprune import errors, local_cluster, storage
from jaxprune.pipeline import workdir

STAGES = ('baseline', 'pruned', 'scratch')


@pytest.fixture(scope='module')
def emulator():
  running = Emulator()
  yield running
  running.stop()


@pytest.fixture
def bucket(emulator):
  return emulator.bucket()


def start(*flags, workdir, emulator, cwd=ROOT, **kwargs):
  return subprocess.Popen(launch_command(*flags, workdir=workdir), cwd=cwd,
                          env={**os.environ, **emulator.env}, text=True, **kwargs)


def run(*flags, workdir, emulator, cwd=ROOT):
  return subprocess.run(launch_command(*flags, workdir=workdir), cwd=cwd, capture_output=True,
                        text=True, timeout=900, env={**os.environ, **emulator.env})


def results(emulator, bucket, run_path='run') -> dict:
  return json.loads(emulator.objects(bucket, f'{run_path}/results.json')
                    [f'{run_path}/results.json'])


def accuracies(rows) -> dict:
  return {row['stage']: row['test_accuracy'] for row in rows}


def closed_port() -> int:
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


# ----------------------------------------------------------------------------- the quick start


def test_the_quick_start_runs_on_gs_with_baseline_and_compilation_cache_there(
    emulator, bucket, tmp_path):
  done = run(*QUICK_FLAGS, f'--baseline_dir=gs://{bucket}/base',
             f'--compilation_cache_dir=gs://{bucket}/cache', workdir=f'gs://{bucket}/run',
             emulator=emulator, cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'Traceback' not in done.stderr
  table = [line.split()[0] for line in done.stdout.splitlines()[2:5]]
  assert table == list(STAGES)
  assert done.stdout.strip().splitlines()[-1] == f'results: gs://{bucket}/run/results.json'
  names = set(emulator.names(bucket))
  assert [r['stage'] for r in results(emulator, bucket)['rows']] == list(STAGES)
  assert {'base/result.json', 'base/metrics.jsonl', 'base/final/checksums.json',
          'run/launch.flags', 'run/prune/record.json', 'run/scratch/result.json',
          'run/scratch/final/checksums.json'} <= names
  for stage in ('base', 'run/scratch'):  # orbax's training checkpoints, through tensorstore
    assert any(n.startswith(f'{stage}/checkpoints/') and n.endswith('/commit_success.txt')
               for n in names)
  assert any(n.startswith('cache/jit_') for n in names)
  for stage in ('base', 'run/scratch'):  # TensorBoard events, through google-cloud-storage
    assert any(n.startswith(f'{stage}/tensorboard/events.out.tfevents') for n in names), stage
  assert not [n for n in names if n.endswith(workdir.CLAIM)]  # released
  assert not list(tmp_path.iterdir())  # nothing written locally


# ----------------------------------------------------------------------------- claims


TRIALS = 20
CLAIMANTS = 8


def _race(claim_at, before_each=None) -> list[int]:
  """For each of TRIALS claim directories, CLAIMANTS threads claim it at once (refusing a
  live holder); returns how many held it, per trial."""
  holders = []
  for trial in range(TRIALS):
    directory = claim_at(trial)
    if before_each is not None:
      before_each(directory)
    gate = threading.Barrier(CLAIMANTS)
    held = []

    def claimant(i, directory=directory, gate=gate, held=held):
      claim = workdir._claim(directory / workdir.CLAIM)
      holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'since': float(i),
                'heartbeat': time.time()}
      gate.wait()
      try:
        workdir._acquire(claim, holder, wait=False, what='stage', settings=())
      except errors.ConfigError:
        return
      held.append(holder)

    threads = [threading.Thread(target=claimant, args=(i,)) for i in range(CLAIMANTS)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    holders.append(len(held))
    if held:  # the claim names the one holder
      assert json.loads(storage.read(str(directory / workdir.CLAIM)).text) == held[0]
  return holders


def test_of_many_concurrent_claimants_of_a_gs_directory_exactly_one_holds_it(emulator,
                                                                             bucket):
  from etils import epath
  assert _race(lambda trial: epath.Path(f'gs://{bucket}/new{trial}')) == [1] * TRIALS


def test_of_many_concurrent_takers_of_a_dead_gs_claim_exactly_one_holds_it(emulator, bucket):
  from etils import epath

  def dead_claim(directory):
    stale = time.time() - workdir.STALE_S - 1
    storage.create(str(directory / workdir.CLAIM), json.dumps(
        {'host': 'elsewhere', 'pid': 1, 'since': stale, 'heartbeat': stale}))
  assert _race(lambda trial: epath.Path(f'gs://{bucket}/dead{trial}'),
               dead_claim) == [1] * TRIALS


def test_a_gs_claim_is_renewed_by_its_holder_and_released(emulator, bucket, monkeypatch):
  from etils import epath
  monkeypatch.setattr(workdir, 'HEARTBEAT_S', 0.05)
  directory = epath.Path(f'gs://{bucket}/stage')
  url = str(directory / workdir.CLAIM)
  with workdir.claimed(directory, wait=False, what='stage'):
    first = json.loads(storage.read(url).text)
    time.sleep(0.5)
    renewed = json.loads(storage.read(url).text)
  assert first['pid'] == renewed['pid'] == os.getpid()
  assert renewed['heartbeat'] > first['heartbeat']
  assert storage.read(url) is None


def test_a_holder_taken_over_stops_renewing_and_leaves_the_new_claim(emulator, bucket,
                                                                     monkeypatch, caplog):
  from etils import epath
  monkeypatch.setattr(workdir, 'HEARTBEAT_S', 0.05)
  directory = epath.Path(f'gs://{bucket}/stage')
  url = str(directory / workdir.CLAIM)
  successor = {'host': 'elsewhere', 'pid': 1, 'since': 1.0, 'heartbeat': time.time()}
  with workdir.claimed(directory, wait=False, what='stage'):
    storage.replace(url, json.dumps(successor), storage.read(url).generation)
    time.sleep(0.5)
  assert json.loads(storage.read(url).text) == successor
  assert f'the claim {url} now belongs to process 1 on elsewhere' in caplog.text


def test_a_damaged_gs_claim_ages_from_when_it_was_written(emulator, bucket, monkeypatch,
                                                          caplog):
  from etils import epath
  monkeypatch.setattr(workdir, 'STALE_S', 0.5)
  directory = epath.Path(f'gs://{bucket}/stage')
  url = str(directory / workdir.CLAIM)
  storage.create(url, '{"host": "elsewh')
  with pytest.raises(errors.ConfigError, match='is in use by process -1 on ?'):
    with workdir.claimed(directory, wait=False, what='stage'):
      pass
  time.sleep(0.6)
  with workdir.claimed(directory, wait=False, what='stage'):
    assert json.loads(storage.read(url).text)['pid'] == os.getpid()
  assert 'which is gone; taking it over' in caplog.text


# ----------------------------------------------------------------------------- refusals


def test_a_bucket_that_does_not_exist_is_one_sentence(emulator):
  with pytest.raises(errors.ConfigError) as raised:
    workdir.check_workdir('gs://no-such-bucket-xyz/run')
  line = errors.as_flags(raised.value)
  assert line.startswith("--workdir 'gs://no-such-bucket-xyz/run': the bucket "
                         'gs://no-such-bucket-xyz does not exist on the GCS emulator at ')
  assert '\n' not in line


def test_a_compilation_cache_in_a_bucket_that_does_not_exist_is_one_sentence(emulator):
  from jaxprune.kernels import compiler
  with pytest.raises(errors.ConfigError, match=r"^compilation_cache_dir 'gs://no-such-bucket-xyz/"
                     r"cache': the bucket gs://no-such-bucket-xyz does not exist on "):
    compiler.use_persistent_cache('gs://no-such-bucket-xyz/cache')


def test_missing_credentials_are_one_sentence(tmp_path, monkeypatch):
  for name in ('STORAGE_EMULATOR_HOST', 'GOOGLE_APPLICATION_CREDENTIALS'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('CLOUDSDK_CONFIG', str(tmp_path))  # no gcloud login there
  monkeypatch.setenv('GCE_METADATA_HOST', f'127.0.0.1:{closed_port()}')  # not a Google VM
  monkeypatch.setenv('GCE_METADATA_IP', f'127.0.0.1:{closed_port()}')
  start_time = time.time()
  with pytest.raises(errors.ConfigError) as raised:
    storage.check('gs://bucket/run', 'baseline_dir')
  assert time.time() - start_time < 10
  assert errors.as_flags(raised.value) == (
      "--baseline_dir 'gs://bucket/run' needs Google Cloud credentials and none were found; "
      'run `gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS to a '
      'key file, or run on a Google Cloud VM with a service account.')


def test_without_the_gcs_extra_a_gs_workdir_is_one_sentence(monkeypatch):
  monkeypatch.setitem(sys.modules, 'gcsfs', None)  # `import gcsfs` now fails
  with pytest.raises(errors.ConfigError) as raised:
    workdir.check_workdir('gs://bucket/run')
  assert errors.as_flags(raised.value) == (
      "--workdir 'gs://bucket/run' is on Google Cloud Storage, which needs the gcs extra: pip "
      "install 'jaxprune[gcs]' (in a clone: pip install -e '.[gcs]').")


def test_another_scheme_is_one_sentence():
  with pytest.raises(errors.ConfigError, match=r"workdir 's3://b/run' is not a path jaxprune "
                     r'can store a run in; give a local directory or gs://BUCKET/PATH\.'):
    workdir.check_workdir('s3://b/run')


def test_gs_unreachable_is_one_sentence_within_45s_writing_nothing(tmp_path):
  # The client library's own retries would take minutes; 45 s leaves room for a loaded
  # 2-core machine's process start.
  emulator_down = f'http://127.0.0.1:{closed_port()}'
  command = launch_command(*QUICK_FLAGS, workdir='gs://no-such-bucket-xyz/run')
  start_time = time.time()
  done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'STORAGE_EMULATOR_HOST': emulator_down})
  elapsed = time.time() - start_time
  assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr[-3000:]
  line = done.stderr.strip().splitlines()[-1]
  assert line == ("error: --workdir 'gs://no-such-bucket-xyz/run': the GCS emulator at "
                  f'{emulator_down} (STORAGE_EMULATOR_HOST) cannot be reached (Connection '
                  'refused); check the network (or start the emulator), or give a local '
                  'directory.')
  assert elapsed < 45, elapsed
  assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- slow


LONG_FLAGS = ('--model=tiny', '--epochs=4', '--batch_size=32', '--max_train=512',
              '--regime=finetune', '--finetune_epochs=4')


def _wait_for_object(emulator, bucket, predicate, process, timeout_s=300):
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if any(predicate(name) for name in emulator.names(bucket)):
      return
    assert process.poll() is None, 'the run ended before it was to be killed'
    time.sleep(0.2)
  raise AssertionError('no such object appeared')


@pytest.mark.slow
def test_kill_9_twice_then_rerun_gives_the_uninterrupted_table(emulator, bucket, tmp_path):
  reference = subprocess.run(launch_command(*LONG_FLAGS, workdir=tmp_path / 'reference'),
                             cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert reference.returncode == 0, reference.stderr[-3000:]
  expected = json.loads((tmp_path / 'reference' / 'results.json').read_text())['rows']
  work = f'gs://{bucket}/run'
  # Killed once the baseline has a checkpoint, then once the fine-tuning has one.
  for checkpointed in ('run/baseline/checkpoints/', 'run/finetune/checkpoints/'):
    process = start(*LONG_FLAGS, workdir=work, emulator=emulator,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_object(emulator, bucket, lambda n, c=checkpointed: n.startswith(c) and
                     n.endswith('/commit_success.txt'), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
  resumed = run(*LONG_FLAGS, workdir=work, emulator=emulator)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'which is gone; taking it over' in resumed.stderr
  assert accuracies(results(emulator, bucket)['rows']) == accuracies(expected)


@pytest.mark.slow
def test_two_runs_sharing_a_gs_baseline_started_2s_apart_train_it_once(emulator, bucket):
  flags = (*QUICK_FLAGS, '--epochs=4', '--max_train=1024', f'--baseline_dir=gs://{bucket}/B')
  first = start(*flags, '--criterion=taylor', workdir=f'gs://{bucket}/W1', emulator=emulator,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  time.sleep(2)
  second = run(*flags, '--criterion=random', workdir=f'gs://{bucket}/W2', emulator=emulator)
  _, first_err = first.communicate(timeout=900)
  assert first.returncode == 0, first_err[-3000:]
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Waiting for baseline' in second.stderr
  assert first_err.count('Stage baseline: ') == 1 and 'epoch 4/4' in first_err
  assert f'gs://{bucket}/B done; using the saved results.' in second.stderr
  baseline = json.loads(emulator.objects(bucket, 'B/result.json')['B/result.json'])
  for work in ('W1', 'W2'):
    rows = results(emulator, bucket, work)['rows']
    assert rows[0]['test_accuracy'] == baseline['test_accuracy']


@pytest.mark.slow
def test_two_processes_of_one_run_share_a_gs_workdir(emulator, bucket, tmp_path):
  command = [sys.executable, '-m', 'jaxprune.local_cluster', '--processes=2',
             '--devices_per_process=1', f'--log_dir={tmp_path}', '--',
             f'--workdir=gs://{bucket}/run', '--compilation_cache_dir=', *QUICK_FLAGS]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env={**local_cluster.environment(1), **emulator.env})
  assert done.returncode == 0, done.stderr[-3000:]
  assert [line.split()[0] for line in done.stdout.splitlines()
          if line.split(' ', 1)[0] in STAGES] == list(STAGES)
  assert [r['stage'] for r in results(emulator, bucket)['rows']] == list(STAGES)
  assert not [n for n in emulator.names(bucket) if n.endswith(workdir.CLAIM) or
              '.multihost-' in n]


@pytest.mark.slow
def test_a_damaged_checkpoint_object_falls_back_to_the_one_before(emulator, bucket):
  flags = (*QUICK_FLAGS, '--epochs=3')
  work = f'gs://{bucket}/run'
  first = run(*flags, workdir=work, emulator=emulator)
  assert first.returncode == 0, first.stderr[-3000:]
  expected = results(emulator, bucket)['rows']
  checkpoints = 'run/scratch/checkpoints/'
  steps = sorted({int(n[len(checkpoints):].split('/')[0])
                  for n in emulator.names(bucket, checkpoints)})
  assert len(steps) == 2
  latest = f'{checkpoints}{steps[-1]}/'
  name, contents = max(emulator.objects(bucket, latest).items(), key=lambda o: len(o[1]))
  bucket_handle = emulator.client.bucket(bucket)
  bucket_handle.blob(name).upload_from_string(contents[:len(contents) // 2])
  bucket_handle.blob('run/scratch/result.json').delete()
  again = run(*flags, workdir=work, emulator=emulator)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'Checkpoint {steps[-1]} of gs://{bucket}/{checkpoints[:-1]} does not restore' in (
      again.stderr)
  assert accuracies(results(emulator, bucket)['rows']) == accuracies(expected)
  assert emulator.names(bucket, f'run/scratch/corrupt_checkpoints/{steps[-1]}/')


def test_the_report_reads_its_snapshots_from_the_bucket(emulator, bucket, tmp_path):
  # One finished run's snapshot, written to the bucket as the experiments write it.
  snapshot = {'experiment': 'random_vs_criterion', 'run': 'random/macs0.50/s0/scratch',
              'labels': {'criterion': 'random', 'budget': 0.5, 'seed': 0, 'regime': 'scratch'},
              'config': {'model': 'tiny', 'width_multiplier': 1.0, 'dataset': 'digits',
                         'seed': 0, 'baseline_dir': 'b0'},
              'rows': [{'stage': 'baseline', 'test_accuracy': 0.6, 'macs': 1000, 'params': 100,
                        'epochs': 3},
                       {'stage': 'scratch', 'test_accuracy': 0.5, 'macs': 500, 'params': 50,
                        'epochs': 3}]}
  code = ('import json, sys; from etils import epath; from jaxprune import storage; '
          'storage.configure(); '
          f'p = epath.Path("gs://{bucket}/exp/random_vs_criterion/random/macs0.50/s0"); '
          'p.mkdir(parents=True, exist_ok=True); '
          '(p / "results_scratch.json").write_text(sys.argv[1])')
  env = {**os.environ, **emulator.env}
  subprocess.run([sys.executable, '-c', code, json.dumps(snapshot)], check=True, env=env,
                 cwd=ROOT, timeout=120)
  built = subprocess.run([sys.executable, '-m', 'experiments.report',
                          f'--root=gs://{bucket}/exp', f'--out={tmp_path}'], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
  assert built.returncode == 0, built.stderr[-2000:]
  assert '| 0.50 | scratch | random | 1 | 50.00 |' in (
      tmp_path / 'random_vs_criterion.md').read_text()
