"""The pipeline end to end (in-process) and launch.py where a process is the point."""

import dataclasses
import json
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import QUICK_FLAGS, ROOT, count_compiles, launch_command
from test_tensorboard import TAGS, scalars
from jaxprune import errors, pipeline
from jaxprune.pipeline import regimes


def test_a_second_run_loads_compiled_programs_from_the_cache(tmp_path, launch):
  cache = tmp_path / 'cache'
  # Every program is stored, however fast it compiled (the default keeps those over 1 s).
  env = {'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'JAX_LOG_COMPILES': '1'}
  flags = (*QUICK_FLAGS, '--regime=scratch', f'--compilation_cache_dir={cache}')
  first = launch(*flags, workdir=tmp_path / 'first', env=env)
  assert first.returncode == 0, first.stderr[-2000:]
  assert any(cache.iterdir())
  second = launch(*flags, workdir=tmp_path / 'second', env=env)
  assert second.returncode == 0, second.stderr[-2000:]
  # The baseline's and the pruned network's training calls (steps_per_call steps each):
  # compiled by the first run, loaded by the second.
  hit = "Persistent compilation cache hit for 'jit_sharded_train_steps'"
  assert (first.stderr.count(hit), second.stderr.count(hit)) == (0, 2)
  rows = [json.loads((tmp_path / run / 'results.json').read_text())['rows']
          for run in ('first', 'second')]
  assert [r['test_accuracy'] for r in rows[0]] == [r['test_accuracy'] for r in rows[1]]
  # The flagfile a run leaves reruns it: same settings, so nothing trains again.
  stamp = (tmp_path / 'first' / 'scratch' / 'result.json').stat().st_mtime_ns
  rerun = subprocess.run(
      launch_command(f"--flagfile={tmp_path / 'first' / 'launch.flags'}",
                     workdir=tmp_path / 'first'), capture_output=True, text=True, cwd=ROOT,
      timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert (tmp_path / 'first' / 'scratch' / 'result.json').stat().st_mtime_ns == stamp
  assert first.stdout.splitlines()[:5] == rerun.stdout.splitlines()[:5]


def test_a_bad_flag_is_one_sentence_naming_the_flag_and_exit_status_1(tmp_path, launch):
  run = launch(*QUICK_FLAGS, '--prune_ratio=1.5', workdir=tmp_path / 'work')
  assert run.returncode == 1
  assert 'Traceback' not in run.stderr
  assert run.stderr.strip().splitlines()[-1] == 'error: --prune_ratio must be below 1, got 1.5.'
  assert not (tmp_path / 'work').exists()


def test_help_lists_every_setting_and_exits_0(tmp_path, launch):
  run = launch('--help', workdir=tmp_path / 'work')
  assert run.returncode == 0, run.stderr[-2000:]
  for setting in pipeline.SETTINGS:
    shown = f'--[no]{setting.name}' if setting.type is bool else f'--{setting.name}'
    assert shown in run.stdout, setting.name
  assert not (tmp_path / 'work').exists()


def test_a_compilation_cache_path_that_is_a_file_is_one_sentence(tmp_path, launch):
  (tmp_path / 'file').write_text('')
  run = launch(*QUICK_FLAGS, f'--compilation_cache_dir={tmp_path / "file"}',
               workdir=tmp_path / 'w')
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1] == (
      f"error: --compilation_cache_dir '{tmp_path / 'file'}' is a file; give a directory, "
      "or '' for no cache.")
  assert not (tmp_path / 'w').exists()


def test_a_bad_environment_choice_stops_before_writing(tmp_path, launch):
  run = launch(*QUICK_FLAGS, workdir=tmp_path / 'work', env={'JAXPRUNE_CONV_IMPL': 'fast'})
  assert run.returncode == 1 and 'Traceback' not in run.stderr
  assert run.stderr.strip().splitlines()[-1].startswith("error: unknown --conv_impl 'fast'")
  assert not (tmp_path / 'work').exists()


def _bad_npz(path, **overrides):
  arrays = {'train_images': np.zeros((40, 8, 8, 3), np.uint8), 'train_labels': np.zeros(40, np.int64),
            'test_images': np.zeros((8, 8, 8, 3), np.uint8), 'test_labels': np.zeros(8, np.int64)}
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize('settings, message', [
    ({'criterion': 'magic'}, "unknown --criterion 'magic'"),
    ({'model': 'resnet7'}, "unknown --model 'resnet7'"),
    ({'regime': 'forever'}, "unknown --regime 'forever'"),
    ({'precision': 'float16'}, "unknown --precision 'float16'; choose one of: bfloat16, float32."),
    ({'prune_ratio': 1.5}, '--prune_ratio must be below 1, got 1.5.'),
    ({'round_to': 0}, '--round_to must be at least 1, got 0.'),
    ({'weight_decay': -1.0}, '--weight_decay must be at least 0, got -1.0.'),
    ({'seed': -1}, '--seed must be at least 0, got -1.'),
    ({'seeds': 2, 'seed_batching': 'parallel'},
     "unknown --seed_batching 'parallel'; choose one of: auto, loop, vmap."),
    ({'round_to': 8, 'schedule': 'iterative'}, "--round_to=8 rounds a one-shot selection's widths"),
    ({'width_profile': 2}, '--width_profile=2 numbers the profiles of --selection=random_widths'),
    ({'lr': float('nan')}, '--lr must be a finite number, got nan.'),
    ({'weight_decay': float('nan')}, '--weight_decay must be a finite number, got nan.'),
    ({'width_multiplier': float('nan')}, '--width_multiplier must be a finite number, got nan.'),
    ({'bn_scale_init': float('inf')}, '--bn_scale_init must be a finite number, got inf.'),
    ({'lr_decay_factor': float('nan')}, '--lr_decay_factor must be a finite number, got nan.'),
    ({'kept_channels': 'random', 'schedule': 'iterative'},
     '--kept_channels=random redraws the channels of a one-shot channel selection'),
    ({'selection': 'random_widths', 'prune_ratio': None, 'target_macs': 0.5,
      'schedule': 'iterative'}, '--schedule=iterative removes the globally lowest channels'),
    ({'selection': 'preset', 'preset': 'resnet56_a', 'prune_ratio': None},
     "preset 'resnet56_a' is for resnet56"),
    ({'selection': 'macs', 'prune_ratio': None}, '--selection=macs needs --target_macs.'),
    ({'dataset': 'npz'}, '--dataset=npz needs --data_path=FILE.npz.'),
    ({'model': 'vgg16'}, 'needs images of at least 16x16 pixels, got 8x8'),
    ({'dataset': 'npz', 'data_path': 'MISSING'}, 'test_labels'),
    ({'dataset': 'npz', 'data_path': 'RANK'}, 'train_images'),
])
def test_bad_input_is_one_sentence_before_anything_is_written(tmp_path, quick_config, settings,
                                                              message):
  if settings.get('data_path') == 'MISSING':
    settings['data_path'] = str(_bad_npz(tmp_path / 'a.npz', test_labels=None))
  if settings.get('data_path') == 'RANK':
    settings['data_path'] = str(
        _bad_npz(tmp_path / 'b.npz', train_images=np.zeros((40, 8, 8), np.uint8)))
  config = quick_config(**settings)
  with pytest.raises(errors.ConfigError) as raised:
    pipeline.run(config)
  line = errors.as_flags(raised.value)
  assert message in line and '\n' not in line
  assert not (tmp_path / 'work').exists()


def test_a_model_too_large_for_the_memory_is_one_sentence_before_anything_is_written(
    tmp_path, quick_config, monkeypatch):
  from jaxprune.pipeline import stages
  monkeypatch.setattr(stages, 'device_memory', lambda: 2 ** 30)
  with pytest.raises(errors.ConfigError) as raised:
    pipeline.run(quick_config(width_multiplier=300.0))
  line = errors.as_flags(raised.value)
  assert line.startswith('tiny at --width_multiplier=300 with --batch_size=') and (
      'GiB per device to train' in line and 'a device here has 1.0 GiB' in line)
  assert not (tmp_path / 'work').exists()


def test_an_internal_error_keeps_its_traceback(monkeypatch, quick_config):
  # A broken invariant (the prune stage handing regimes widths the structure never had) is
  # a bug: exit_on_user_error lets it through with its traceback instead of one line.
  from jaxprune.prune import shrink
  monkeypatch.setattr(shrink, 'shrink', lambda structure, variables, masks: ({'nope': 1}, {}, {}))
  with pytest.raises(Exception) as raised, errors.exit_on_user_error():
    pipeline.run(quick_config(regime='scratch'))
  assert not isinstance(raised.value, (errors.ConfigError, SystemExit))
  assert raised.traceback


def test_a_diverged_stage_stops_in_one_sentence_and_a_smaller_lr_resumes_it(quick_config,
                                                                            tmp_path):
  diverging = quick_config(lr=1e6, epochs=3, regime='scratch')
  with pytest.raises(errors.Diverged) as raised:
    pipeline.run(diverging)
  message = str(raised.value)
  assert f"stage {tmp_path / 'work' / 'baseline'}:" in message
  assert f'epoch {raised.value.epoch}' in message
  assert f'step {raised.value.step}' in message and '\n' not in message
  stage = tmp_path / 'work' / 'baseline'
  assert (stage / 'diverged.json').exists() and not (stage / 'result.json').exists()
  checkpoints = sorted(int(p.name) for p in (stage / 'checkpoints').iterdir() if p.name.isdigit())
  assert checkpoints[-1:] == ([raised.value.resume_step] if raised.value.resume_step else [])
  results = pipeline.run(dataclasses.replace(diverging, lr=0.05))
  assert np.isfinite(results['rows'][0]['test_accuracy'])
  assert not (stage / 'diverged.json').exists()
  assert json.loads((stage / 'stage_config.json').read_text())['lr'] == 0.05


def test_all_regimes_run_and_report_with_their_performance_options(quick_config, tmp_path):
  results = pipeline.run(quick_config(criterion='random', regime='all'))
  assert [r['stage'] for r in results['rows']] == ['baseline', 'pruned', *regimes.REGIMES]
  table = pipeline.format_table(results)
  for stage in ('baseline', 'pruned') + regimes.REGIMES:
    assert f'\n{stage} ' in '\n' + table
  stored = json.loads((tmp_path / 'work' / 'results.json').read_text())
  assert stored['config']['criterion'] == 'random'
  assert stored['devices'] and stored['versions']['jax']
  options = {'conv_impl': 'auto', 'batch_norm': 'jaxprune', 'xla_options': 'jaxprune'}
  assert stored['performance'] == options
  work = tmp_path / 'work'
  assert json.loads((work / 'prune' / 'record.json').read_text())['performance'] == options
  for stage in ('baseline',) + regimes.REGIMES:
    result = json.loads((work / stage / 'result.json').read_text())
    assert result['performance'] == options
    # What `tensorboard --logdir=WORKDIR` shows for the stage: one point per epoch of each.
    points = scalars(work / stage)
    assert set(points) == set(TAGS), stage
    assert all(len(values) == result['epochs'] for values in points.values()), stage


def test_rerunning_a_finished_run_trains_nothing_and_gives_the_same_results(quick_config,
                                                                           tmp_path):
  config = quick_config(regime='scratch')
  first = pipeline.run(config)
  stamp = (tmp_path / 'work' / 'scratch' / 'result.json').stat().st_mtime_ns
  again = pipeline.run(config)
  assert (tmp_path / 'work' / 'scratch' / 'result.json').stat().st_mtime_ns == stamp
  assert [r['test_accuracy'] for r in first['rows']] == [r['test_accuracy'] for r in again['rows']]


def test_a_workdir_from_another_configuration_is_refused_untouched(quick_config, tmp_path):
  pipeline.run(quick_config(regime='scratch'))
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()}
  with pytest.raises(errors.ConfigError) as raised:
    pipeline.run(quick_config(regime='scratch', seed=1))
  assert 'was made with --seed=0, not 1' in errors.as_flags(raised.value)
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()} == before


def test_round_to_gives_widths_in_multiples(quick_config, tmp_path):
  pipeline.run(quick_config(selection='global', prune_ratio=0.4, round_to=4, regime='finetune'))
  record = json.loads((tmp_path / 'work' / 'prune' / 'record.json').read_text())
  for group, width in record['widths'].items():
    assert width % 4 == 0 or width == record['widths_before'][group], (group, width)
  assert record['widths'] != record['widths_before']


def test_scratch_b_epochs_scale_with_the_macs_ratio_and_respect_the_cap():
  assert regimes.scratch_b_epochs(160, 300, 100, None) == 480
  assert regimes.scratch_b_epochs(160, 300, 100, 2.0) == 320
  assert regimes.scratch_b_epochs(10, 1000, 700, None) == int(10 * 1000 / 700)


def test_scratch_b_stage_trains_the_scaled_epochs(quick_config, tmp_path):
  results = pipeline.run(quick_config(epochs=2, regime='scratch_b', prune_ratio=0.6))
  rows = {r['stage']: r for r in results['rows']}
  assert rows['scratch_b']['epochs'] == int(2 * rows['baseline']['macs'] / rows['pruned']['macs'])
  stored = json.loads((tmp_path / 'work' / 'scratch_b' / 'result.json').read_text())
  assert stored['epochs'] == rows['scratch_b']['epochs']


def test_iterative_schedule_compiles_the_train_step_once_per_stage(quick_config, tmp_path,
                                                                   caplog):
  # Batch 16, which no other test uses: the compiled steps of earlier tests in this process
  # are not reused, so every compilation the run needs is counted.
  config = quick_config(batch_size=16, schedule='iterative', prune_ratio=0.2, prune_every=4,
                        prune_step=2, regime='finetune', criterion='taylor')
  _, compiles = count_compiles(caplog, lambda: pipeline.run(config), 'sharded_train_step')
  prune_stage = tmp_path / 'work' / 'prune'
  record = json.loads((prune_stage / 'record.json').read_text())
  removed = sum(len(m) - sum(m) for m in record['masks'].values())
  assert removed == int(0.2 * (8 + 16 + 16))
  curve = [json.loads(l) for l in
           (prune_stage / 'finetune' / 'pruning_curve.jsonl').read_text().splitlines()]
  assert curve[-1]['channels_removed'] == removed and curve[-1]['macs'] == record['macs_after']
  # Baseline, iterative pruning (masks changed removed/2 times) and finetune: one each.
  assert compiles == 3


@pytest.mark.parametrize('signum, status, said, last_line', [
    (signal.SIGTERM, 75, 'SIGTERM received: saving at the next step', 'preempted: step '),
    # The same path as SIGTERM with another status and line: -m slow.
    pytest.param(signal.SIGINT, 130, 'Ctrl-C: saving at the next step', 'interrupted: step ',
                 marks=pytest.mark.slow),
], ids=['sigterm', 'ctrl_c'])
def test_sigterm_or_ctrl_c_saves_exits_with_its_status_and_the_same_command_resumes(
    tmp_path, launch, signum, status, said, last_line):
  flags = (*QUICK_FLAGS, '--epochs=3', '--max_train=512', '--regime=scratch')
  proc = subprocess.Popen(launch_command(*flags, workdir=tmp_path), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not list(tmp_path.glob('baseline/checkpoints/*')) and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == status, stderr[-2000:]
  assert 'Traceback' not in stderr and said in stderr
  assert stderr.strip().splitlines()[-1].startswith(last_line)
  resumed = launch(*flags, workdir=tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert (tmp_path / 'scratch' / 'result.json').exists()


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_to_the_uninterrupted_result(tmp_path, launch):
  import random
  flags = ['--model=tiny', '--epochs=4', '--batch_size=32', '--max_train=512', '--regime=finetune',
           '--finetune_epochs=4']
  reference = launch(*flags, workdir=tmp_path / 'reference')
  assert reference.returncode == 0
  expected = json.loads((tmp_path / 'reference' / 'results.json').read_text())['rows']
  for trial in range(3):
    workdir = tmp_path / f'killed{trial}'
    proc = subprocess.Popen(launch_command(*flags, workdir=workdir), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.uniform(8, 25))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = launch(*flags, workdir=workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((workdir / 'results.json').read_text())['rows']
    assert [r['test_accuracy'] for r in got] == [r['test_accuracy'] for r in expected]


def test_each_seed_copy_equals_a_separate_run_and_shares_compiled_steps(quick_config, tmp_path,
                                                                        caplog):
  config = quick_config(workdir=str(tmp_path / 'many'), prune_ratio=0.3, regime='scratch',
                        seed=3, seeds=2)
  many, compiles = count_compiles(caplog, lambda: pipeline.run(config), 'sharded_train_step')
  # Two seeds' baselines share one compiled step; each pruned width set may add one more.
  assert compiles <= 3
  alone = pipeline.run(dataclasses.replace(config, seed=4, seeds=1,
                                           workdir=str(tmp_path / 'alone')))
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


def test_vmapped_seeds_equal_looped_seeds_and_group_equal_widths(quick_config, tmp_path):
  # A per-layer selection gives both seeds the same widths, so scratch trains as one group.
  config = quick_config(workdir=str(tmp_path / 'loop'), epochs=2, selection='layer',
                        prune_ratio=0.3, regime='scratch', seed=3, seeds=2, seed_batching='loop')
  looped = pipeline.run(config)
  vmapped = pipeline.run(dataclasses.replace(config, workdir=str(tmp_path / 'vmap'),
                                             seed_batching='vmap'))
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
