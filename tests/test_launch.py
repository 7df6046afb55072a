"""launch.py and the pipeline end to end, as a user runs them."""

import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxprune import pipeline
from jaxprune.pipeline import regimes

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = ['--model=tiny', '--epochs=1', '--batch_size=32', '--max_train=256',
         '--finetune_epochs=1']


def command(*flags, workdir) -> list[str]:
  """The launch.py command line for `flags`.

  No persistent compilation cache unless a test names one: each run compiles, as the
  compile-counting tests expect, and nothing is written outside tmp_path.
  """
  if not any(f.startswith('--compilation_cache_dir') for f in flags):
    flags += ('--compilation_cache_dir=',)
  return [sys.executable, str(ROOT / 'launch.py'), f'--workdir={workdir}', *flags]


def launch(*flags, workdir, env=None):
  return subprocess.run(command(*flags, workdir=workdir), capture_output=True, text=True,
                        cwd=ROOT, timeout=600,
                        env=None if env is None else {**os.environ, **env})


def test_a_second_run_loads_compiled_programs_from_the_cache(tmp_path):
  cache = tmp_path / 'cache'
  # Every program is stored, however fast it compiled (the default keeps those over 1 s).
  env = {'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'JAX_LOG_COMPILES': '1'}
  flags = (*QUICK, '--regime=scratch', f'--compilation_cache_dir={cache}')
  first = launch(*flags, workdir=tmp_path / 'first', env=env)
  assert first.returncode == 0, first.stderr[-2000:]
  assert any(cache.iterdir())
  second = launch(*flags, workdir=tmp_path / 'second', env=env)
  assert second.returncode == 0, second.stderr[-2000:]
  # The baseline's and the pruned network's train steps: compiled by the first run, loaded
  # by the second.
  hit = "Persistent compilation cache hit for 'jit_sharded_train_step'"
  assert (first.stderr.count(hit), second.stderr.count(hit)) == (0, 2)
  rows = [json.loads((tmp_path / run / 'results.json').read_text())['rows']
          for run in ('first', 'second')]
  assert [r['test_accuracy'] for r in rows[0]] == [r['test_accuracy'] for r in rows[1]]


def test_a_compilation_cache_path_that_is_a_file_is_one_sentence(tmp_path):
  (tmp_path / 'file').write_text('')
  run = launch(*QUICK, f'--compilation_cache_dir={tmp_path / "file"}', workdir=tmp_path / 'w')
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1] == (
      f"error: compilation cache directory '{tmp_path / 'file'}' is a file; give a directory, "
      "or '' for no cache.")
  assert not (tmp_path / 'w').exists()


def test_all_regimes_run_and_report(tmp_path):
  run = launch(*QUICK, '--criterion=random', '--regime=all', workdir=tmp_path)
  assert run.returncode == 0, run.stderr[-2000:]
  for stage in ('baseline', 'pruned') + regimes.REGIMES:
    assert f'\n{stage} ' in '\n' + run.stdout
  results = json.loads((tmp_path / 'results.json').read_text())
  assert [r['stage'] for r in results['rows']] == ['baseline', 'pruned', *regimes.REGIMES]
  assert results['config']['criterion'] == 'random'
  assert results['devices'] and results['versions']['jax']


def test_rerunning_a_finished_run_trains_nothing_and_prints_the_same_table(tmp_path):
  first = launch(*QUICK, '--regime=scratch', workdir=tmp_path)
  assert first.returncode == 0, first.stderr[-2000:]
  stamp = (tmp_path / 'scratch' / 'result.json').stat().st_mtime_ns
  again = launch(*QUICK, '--regime=scratch', workdir=tmp_path)
  assert again.returncode == 0
  assert (tmp_path / 'scratch' / 'result.json').stat().st_mtime_ns == stamp
  table = lambda out: [l for l in out.splitlines() if l.split()[:1] in (['baseline'], ['scratch'])]
  assert [l.split()[:2] for l in table(first.stdout)] == [l.split()[:2] for l in table(again.stdout)]


def _bad_npz(path, **overrides):
  arrays = {'train_images': np.zeros((40, 8, 8, 3), np.uint8), 'train_labels': np.zeros(40, np.int64),
            'test_images': np.zeros((8, 8, 8, 3), np.uint8), 'test_labels': np.zeros(8, np.int64)}
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize('flags, message', [
    (['--criterion=magic'], "unknown criterion 'magic'"),
    (['--model=resnet7'], "unknown model 'resnet7'"),
    (['--regime=forever'], "unknown regime 'forever'"),
    (['--precision=float16'], "unknown precision 'float16'; choose one of: bfloat16, float32."),
    (['--prune_ratio=1.5'], 'prune_ratio must be in [0, 1), got 1.5'),
    (['--round_to=0'], '--round_to must be at least 1, got 0.'),
    (['--weight_decay=-1'], '--weight_decay must be at least 0, got -1.0.'),
    (['--seed=-1'], '--seed must be at least 0, got -1.'),
    (['--seeds=2', '--seed_batching=parallel'],
     "unknown --seed_batching 'parallel'; choose one of: auto, loop, vmap."),
    (['--round_to=8', '--schedule=iterative'], "--round_to=8 rounds a one-shot selection's widths"),
    (['--selection=preset', '--preset=resnet56_a'], "preset 'resnet56_a' is for resnet56"),
    (['--model=vgg16'], 'needs images of at least 16x16 pixels, got 8x8'),
    (['--dataset=npz', 'NPZ_MISSING'], 'test_labels'),
    (['--dataset=npz', 'NPZ_RANK'], 'train_images'),
])
def test_bad_input_stops_with_one_sentence(tmp_path, flags, message):
  flags = list(flags)
  if 'NPZ_MISSING' in flags:
    flags[flags.index('NPZ_MISSING')] = f"--data_path={_bad_npz(tmp_path / 'a.npz', test_labels=None)}"
  if 'NPZ_RANK' in flags:
    flags[flags.index('NPZ_RANK')] = (
        f"--data_path={_bad_npz(tmp_path / 'b.npz', train_images=np.zeros((40, 8, 8), np.uint8))}")
  run = launch(*QUICK, *flags, workdir=tmp_path / 'work')
  assert run.returncode != 0
  assert 'Traceback' not in run.stderr
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, run.stderr[-1500:]
  assert not (tmp_path / 'work' / 'baseline' / 'result.json').exists()


@pytest.mark.parametrize('variable, message', [
    ('JAXPRUNE_XLA_OPTIONS', "JAXPRUNE_XLA_OPTIONS='fast' is not a choice; use one of jaxprune, xla."),
    ('JAXPRUNE_CONV_IMPL', "JAXPRUNE_CONV_IMPL= 'fast' is not a convolution implementation"),
])
def test_a_bad_environment_choice_stops_before_writing(tmp_path, monkeypatch, variable, message):
  monkeypatch.setenv(variable, 'fast')
  run = launch(*QUICK, workdir=tmp_path / 'work')
  assert run.returncode != 0 and 'Traceback' not in run.stderr
  assert message in run.stderr.strip().splitlines()[-1], run.stderr[-1500:]
  assert not (tmp_path / 'work').exists()


def test_a_workdir_from_another_configuration_is_refused_untouched(tmp_path):
  assert launch(*QUICK, '--regime=scratch', workdir=tmp_path).returncode == 0
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()}
  run = launch(*QUICK, '--regime=scratch', '--seed=1', workdir=tmp_path)
  assert run.returncode != 0 and 'Traceback' not in run.stderr
  assert 'was made with seed=0, not 1' in run.stderr.strip().splitlines()[-1]
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()} == before


def test_round_to_gives_widths_in_multiples(tmp_path):
  run = launch(*QUICK, '--selection=global', '--prune_ratio=0.4', '--round_to=4',
               '--regime=finetune', workdir=tmp_path)
  assert run.returncode == 0, run.stderr[-2000:]
  record = json.loads((tmp_path / 'prune' / 'record.json').read_text())
  for group, width in record['widths'].items():
    assert width % 4 == 0 or width == record['widths_before'][group], (group, width)
  assert record['widths'] != record['widths_before']


def test_scratch_b_epochs_scale_with_the_macs_ratio_and_respect_the_cap():
  assert regimes.scratch_b_epochs(160, 300, 100, None) == 480
  assert regimes.scratch_b_epochs(160, 300, 100, 2.0) == 320
  assert regimes.scratch_b_epochs(10, 1000, 700, None) == int(10 * 1000 / 700)


def test_scratch_b_stage_trains_the_scaled_epochs(tmp_path):
  run = launch(*QUICK, '--epochs=2', '--regime=scratch_b', '--prune_ratio=0.6', workdir=tmp_path)
  assert run.returncode == 0, run.stderr[-2000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  rows = {r['stage']: r for r in results['rows']}
  assert rows['scratch_b']['epochs'] == int(2 * rows['baseline']['macs'] / rows['pruned']['macs'])
  assert json.loads((tmp_path / 'scratch_b' / 'result.json').read_text())['epochs'] == rows['scratch_b']['epochs']


def test_iterative_schedule_compiles_the_train_step_once_per_stage(tmp_path, caplog):
  import jax
  config = pipeline.Config(workdir=str(tmp_path), model='tiny', epochs=1, batch_size=32,
                           max_train=256, schedule='iterative', prune_ratio=0.2, prune_every=2,
                           prune_step=2, regime='finetune', finetune_epochs=1, criterion='taylor')
  jax.config.update('jax_log_compiles', True)
  try:
    with caplog.at_level(logging.WARNING):
      pipeline.run(config)
  finally:
    jax.config.update('jax_log_compiles', False)
  compiles = [r for r in caplog.records
              if 'Compiling' in r.getMessage() and 'sharded_train_step' in r.getMessage()]
  record = json.loads((tmp_path / 'prune' / 'record.json').read_text())
  removed = sum(len(m) - sum(m) for m in record['masks'].values())
  assert removed == int(0.2 * (8 + 16 + 16))
  curve = [json.loads(l) for l in
           (tmp_path / 'prune' / 'finetune' / 'pruning_curve.jsonl').read_text().splitlines()]
  assert curve[-1]['channels_removed'] == removed and curve[-1]['macs'] == record['macs_after']
  # Baseline, iterative pruning (masks changed removed/2 times) and finetune: one each.
  assert len(compiles) == 3


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_to_the_uninterrupted_result(tmp_path):
  import random
  import signal
  import time
  flags = ['--model=tiny', '--epochs=4', '--batch_size=32', '--max_train=512', '--regime=finetune',
           '--finetune_epochs=4']
  reference = launch(*flags, workdir=tmp_path / 'reference')
  assert reference.returncode == 0
  expected = json.loads((tmp_path / 'reference' / 'results.json').read_text())['rows']
  for trial in range(3):
    workdir = tmp_path / f'killed{trial}'
    proc = subprocess.Popen(command(*flags, workdir=workdir), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.uniform(8, 25))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = launch(*flags, workdir=workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((workdir / 'results.json').read_text())['rows']
    assert [r['test_accuracy'] for r in got] == [r['test_accuracy'] for r in expected]


def test_each_seed_copy_equals_a_separate_run_and_shares_compiled_steps(tmp_path, caplog):
  import jax
  config = pipeline.Config(workdir=str(tmp_path / 'many'), model='tiny', epochs=1, batch_size=32,
                           max_train=256, prune_ratio=0.3, regime='scratch', seed=3)
  jax.config.update('jax_log_compiles', True)
  try:
    with caplog.at_level(logging.WARNING):
      many = pipeline.run_seeds(config, 2)
  finally:
    jax.config.update('jax_log_compiles', False)
  baseline_compiles = [r for r in caplog.records if 'Compiling' in r.getMessage()
                       and 'sharded_train_step' in r.getMessage()]
  # Two seeds' baselines share one compiled step; each pruned width set may add one more.
  assert len(baseline_compiles) <= 3
  alone = pipeline.run(dataclasses.replace(config, seed=4, workdir=str(tmp_path / 'alone')))
  assert [r['test_accuracy'] for r in many['per_seed'][1]['rows']] == [
      r['test_accuracy'] for r in alone['rows']]
  accuracies = [r['rows'][0]['test_accuracy'] for r in many['per_seed']]
  assert many['rows'][0]['test_accuracy'] == pytest.approx(np.mean(accuracies))
  assert many['rows'][0]['test_accuracy_std'] == pytest.approx(np.std(accuracies, ddof=1))


@pytest.mark.parametrize('name,backend,expected', [
    ('auto', 'cpu', 'loop'), ('auto', 'gpu', 'loop'), ('auto', 'tpu', 'vmap'),
    ('vmap', 'cpu', 'vmap'), ('loop', 'tpu', 'loop')])
def test_seed_batching_auto_loops_except_on_tpus(name, backend, expected):
  assert pipeline.seed_batching_for(name, backend) == expected


def test_vmapped_seeds_equal_looped_seeds_and_group_equal_widths(tmp_path):
  # A per-layer selection gives both seeds the same widths, so scratch trains as one group.
  config = pipeline.Config(workdir=str(tmp_path / 'loop'), model='tiny', epochs=2,
                           batch_size=32, max_train=256, selection='layer', prune_ratio=0.3,
                           regime='scratch', seed=3)
  looped = pipeline.run_seeds(config, 2, 'loop')
  vmapped = pipeline.run_seeds(dataclasses.replace(config, workdir=str(tmp_path / 'vmap')), 2,
                               'vmap')
  assert (looped['seed_batching'], vmapped['seed_batching']) == ('loop', 'vmap')
  for stage in ('baseline', 'scratch'):
    assert (tmp_path / 'vmap' / 'vmapped' / stage / 'copies-3-4').is_dir()
  for loop_run, vmap_run in zip(looped['per_seed'], vmapped['per_seed']):
    assert [r['stage'] for r in vmap_run['rows']] == ['baseline', 'pruned', 'scratch']
    for loop_row, vmap_row in zip(loop_run['rows'], vmap_run['rows']):
      # 64 test images: float rounding may move at most a prediction or two.
      assert vmap_row['test_accuracy'] == pytest.approx(loop_row['test_accuracy'], abs=2.5 / 64)
      assert vmap_row['macs'] == loop_row['macs']
  for seed in (3, 4):
    loop_metrics = (tmp_path / 'loop' / f'seed{seed}' / 'scratch' / 'metrics.jsonl')
    vmap_metrics = (tmp_path / 'vmap' / f'seed{seed}' / 'scratch' / 'metrics.jsonl')
    losses = [[json.loads(l)['train_loss'] for l in m.read_text().splitlines()]
              for m in (loop_metrics, vmap_metrics)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)
