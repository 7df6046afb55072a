"""The experiments' runner and report tool: dry runs, a run to the tables, paired statistics by hand."""

import importlib
import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import architecture_latency, common, report  # noqa: E402

PLANNED = ('random_vs_criterion', 'rethinking', 'taylor_curves', 'crowley')
# Dry runs check settings but read no data: the mini scale's npz need not exist.
MINI_DATA = '--data_path=cifar10_sample.npz'


def error_line(capsys, main, *args, **kwargs) -> str:
  """The one line a command-line tool prints when it stops on bad input (exit status 1)."""
  with pytest.raises(SystemExit) as stopped:
    main(*args, **kwargs)
  assert stopped.value.code == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  return lines[0]


def _scales(name: str) -> tuple[str, ...]:
  return getattr(importlib.import_module(f'experiments.{name}'), 'SCALES', ('mini', 'full'))


@pytest.mark.parametrize('name, scale', [(n, s) for n in PLANNED for s in _scales(n)])
def test_dry_run_prints_planned_runs_and_runs_nothing(name, scale, tmp_path, capsys):
  module = importlib.import_module(f'experiments.{name}')
  runs = common.main(module.EXPERIMENT, module.plan, extra_flags=module.extra_flags,
                     argv=[f'--scale={scale}', f'--root={tmp_path}', '--dry_run', MINI_DATA],
                     scales=_scales(name))
  out = capsys.readouterr().out
  assert runs and f'{len(runs)} runs' in out
  for run in runs:
    assert run.name in out
  assert not any(p.name != 'baselines' for p in tmp_path.iterdir())  # nothing trained or written


@pytest.mark.parametrize('flag, sentence', [
    ('--budgets=1.5', "error: --budgets value 1.5: target_macs must be at most 1, got 1.5."),
    ('--seeds=0,one', "error: --seeds '0,one' is not a comma-separated list of whole numbers "
                      ">= 0, e.g. 0,1,2."),
    ('--budgets=0.5,half', "error: --budgets '0.5,half' is not a comma-separated list of numbers."),
    ('--regimes=', 'error: --regimes is empty; give one or more comma-separated names.'),
    ('--data_path=', 'error: --scale=mini trains on an .npz file (dataset npz): give '
                     '--data_path=FILE.npz, e.g. the CIFAR-10 sample.'),
])
def test_a_bad_value_stops_with_one_sentence(tmp_path, capsys, flag, sentence):
  module = importlib.import_module('experiments.random_vs_criterion')
  line = error_line(capsys, common.main, module.EXPERIMENT, module.plan,
                    extra_flags=module.extra_flags,
                    argv=[f'--root={tmp_path}', MINI_DATA, flag, '--dry_run'])
  assert line == sentence


@pytest.mark.parametrize('argv, sentence', [
    (['--scale=bogus'], 'error: flag --scale=bogus: value should be one of <mini|midi|full>.'),
    (['--epochs=ten'], "error: flag --epochs=ten: invalid literal for int() with base 10: 'ten'."),
    (['--selection=global'], 'error: flag --selection=global: value should be one of '
                             '<macs|macs_l2>.'),
    (['--bogus=1'], "error: Unknown command line flag 'bogus'."),
    (['runs'], "error: unexpected arguments ['runs']; every setting is a --flag (see --help)."),
])
def test_a_flag_that_does_not_parse_stops_with_one_sentence(tmp_path, capsys, argv, sentence):
  from experiments import random_vs_criterion as rvc
  line = error_line(capsys, common.main, rvc.EXPERIMENT, rvc.plan, extra_flags=rvc.extra_flags,
                    scales=rvc.SCALES, argv=[f'--root={tmp_path}', MINI_DATA, '--dry_run', *argv])
  assert line == sentence
  assert list(tmp_path.iterdir()) == []


def test_setting_flags_are_launch_py_flags_unset_with_the_scale_defaults_in_help():
  from absl import flags
  from jaxprune.pipeline import config
  flag_values = flags.FlagValues()
  common.define_flags(flag_values, {'mini': {'model': 'resnet8'}}, scales=('mini', 'full'))
  for name in common.OVERRIDABLE:
    assert flag_values[name].default is None
    assert flag_values[name].help.startswith(config.BY_NAME[name].full_help()), name
  assert flag_values['model'].help.endswith(' Default: resnet8 (mini).')
  assert flag_values['epochs'].help.endswith(' Default: 8 (mini), 160 (full).')


@pytest.mark.parametrize('name', PLANNED + ('imagenet', 'criteria_vs_oracle', 'report', 'subset'))
def test_help_lists_every_flag_and_exits_0(name, capsys):
  module = importlib.import_module(f'experiments.{name}')
  with pytest.raises(SystemExit) as stopped:
    if hasattr(module, 'plan') and name != 'criteria_vs_oracle':
      common.main(module.EXPERIMENT, module.plan, extra_flags=module.extra_flags,
                  description=module.__doc__, scales=_scales(name), argv=['--help'])
    else:
      module.main(['--help'])
  assert stopped.value.code == 0
  text = capsys.readouterr().out
  assert text.startswith(f'usage: python -m experiments.{name} ')
  assert module.__doc__.strip().splitlines()[0] in text
  expected = {'report': ('root', 'out', 'archive'),
              'subset': ('data_path', 'per_class', 'seed', 'out')}.get(
      name, ('scale', 'root', 'archive', 'seeds', '[no]dry_run', *common.OVERRIDABLE))
  for flag in expected + ('flagfile',):
    assert f'  --{flag}: ' in text, flag
  if name == 'random_vs_criterion':
    assert 'Default: 8 (mini), 15 (midi), 160 (full).' in ' '.join(text.split())
    for flag in ('criteria', 'budgets', 'regimes', 'channel_criteria', 'channel_budgets',
                 'profiles', '[no]uniform', 'selection', '[no]latency'):
      assert f'  --{flag}: ' in text, flag


def test_bool_flags_take_absl_spellings_and_values_may_follow_their_flag(tmp_path):
  from experiments import random_vs_criterion as rvc
  argv = ['--root', str(tmp_path), '--dry_run', '--seeds', '0', MINI_DATA, '--budgets=0.5']
  planned = {}
  for uniform in ('--uniform', '--nouniform', '--uniform=false'):
    runs = common.main(rvc.EXPERIMENT, rvc.plan, extra_flags=rvc.extra_flags, scales=rvc.SCALES,
                       argv=argv + [uniform])
    planned[uniform] = {r.config.regime for r in runs}
    assert {r.config.workdir.split(os.sep)[len(tmp_path.parts)] for r in runs} == {rvc.EXPERIMENT}
  assert 'reduced' in planned['--uniform']
  assert 'reduced' not in planned['--nouniform'] and planned['--nouniform'] == planned[
      '--uniform=false']


@pytest.mark.parametrize('flag, sentence', [
    ('--seeds=-1', "error: --seeds '-1' is not a comma-separated list"),
    ('--criteria=l1,bogus', "error: --criteria value 'bogus': unknown criterion 'bogus'; choose "
                            "one of:"),
    ('--batches=0', 'error: --batches must be at least 1, got 0.'),
])
def test_criteria_vs_oracle_bad_values_stop_with_one_sentence(tmp_path, capsys, flag, sentence):
  from experiments import criteria_vs_oracle
  line = error_line(capsys, criteria_vs_oracle.main,
                    [f'--root={tmp_path}', '--dry_run', MINI_DATA, flag])
  assert line.startswith(sentence)
  assert list(tmp_path.iterdir()) == []


def test_report_without_results_says_so_and_writes_nothing(tmp_path):
  for root, sentence in [(tmp_path / 'missing', 'is not a directory.'),
                         (tmp_path, 'no experiment results (results_*.json or agreement.json')]:
    with pytest.raises(SystemExit) as stopped:
      report.main([f'--root={root}', f"--out={tmp_path / 'tables'}"])
    assert stopped.value.code.startswith('error: ') and sentence in stopped.value.code
  assert not (tmp_path / 'tables').exists()


def test_criteria_vs_oracle_dry_run_prints_one_line_per_seed(tmp_path, capsys):
  from experiments import criteria_vs_oracle
  planned = criteria_vs_oracle.main([f'--root={tmp_path}', '--dry_run', '--seeds=0,1,2',
                                     MINI_DATA])
  out = capsys.readouterr().out
  assert len(planned) == 3 and out.count('agreement.json') == 3 and 'oracle' in out
  assert list(tmp_path.iterdir()) == []


def test_runs_share_one_baseline_per_model_and_seed(tmp_path):
  from experiments import random_vs_criterion as rvc
  runs = common.main(rvc.EXPERIMENT, rvc.plan, extra_flags=rvc.extra_flags,
                     argv=[f'--root={tmp_path}', '--dry_run', '--seeds=0,1', MINI_DATA])
  assert len({r.config.baseline_dir for r in runs}) == 2
  # The regimes of one pruned network, and the uniform network, share its prune stage.
  shared = [r for r in runs if r.config.workdir.endswith(os.path.join('random', 'macs0.50', 's1'))]
  assert sorted(r.config.regime for r in shared) == sorted((*rvc.REGIMES, 'reduced'))


def test_midi_scale_runs_the_issue_settings(tmp_path):
  from experiments import random_vs_criterion, rethinking
  argv = ['--scale=midi', f'--root={tmp_path}', '--dry_run', MINI_DATA]
  l1 = common.main(rethinking.EXPERIMENT, rethinking.plan, extra_flags=rethinking.extra_flags,
                   argv=argv, scales=rethinking.SCALES)
  open_question = common.main(random_vs_criterion.EXPERIMENT, random_vs_criterion.plan,
                              extra_flags=random_vs_criterion.extra_flags, argv=argv,
                              scales=random_vs_criterion.SCALES)
  for run in l1 + open_question:
    c = run.config
    assert (c.model, c.width_multiplier, c.epochs, c.batch_size, c.lr, c.lr_schedule,
            c.weight_decay, c.max_train, c.scratch_b_cap) == (
                'vgg11', 0.5, 15, 64, 0.1, 'step', 1e-4, None, None)
  assert {(r.config.regime, r.config.selection, r.config.prune_ratio, r.config.seed) for r in l1} == {
      (regime, 'layer', 0.5, seed) for regime in ('finetune', 'scratch', 'scratch_b')
      for seed in (0, 1, 2)}
  assert all((r.config.finetune_epochs, r.config.finetune_lr) == (3, 1e-3) for r in l1)
  scratch = {(r.labels['architecture'], r.config.selection, r.config.target_macs,
              r.config.regime) for r in open_question if r.labels['regime'] == 'scratch'}
  assert scratch == {(a, 'macs_l2', b, 'scratch') for a in ('taylor', 'l1', 'random')
                     for b in (0.5, 0.25)} | {
      ('uniform', 'macs_l2', b, 'reduced') for b in (0.5, 0.25)} | {
      (f'profile{k}', 'random_widths', b, 'scratch') for k in (0, 1) for b in (0.5, 0.25)}
  finetuned = {(r.config.criterion, r.config.kept_channels, r.config.target_macs)
               for r in open_question if r.config.regime == 'finetune'}
  assert finetuned == {(c, k, 0.5) for c in ('taylor', 'l1') for k in ('criterion', 'random')}
  assert {r.config.seed for r in open_question} == {0, 1, 2}
  # Every seed trains the same sampled profiles.
  assert {r.config.width_profile for r in open_question
          if r.config.selection == 'random_widths'} == {0, 1}
  # The open question prunes the same baselines as the L1 comparison.
  assert {r.config.baseline_dir for r in l1} == {r.config.baseline_dir for r in open_question}


def test_architectures_of_equal_cost_train_time_and_reach_the_tables(tmp_path, capsys):
  from experiments import random_vs_criterion as rvc
  root = tmp_path / 'root'
  argv = ['--scale=mini', '--model=tiny', '--dataset=digits', '--epochs=1', '--finetune_epochs=1',
          '--budgets=0.5', '--criteria=random', '--regimes=scratch', '--profiles=1',
          '--channel_criteria=l1', '--seeds=0', f'--root={root}',
          f"--archive={tmp_path / 'kept'}"]
  kwargs = dict(extra_flags=rvc.extra_flags, scales=rvc.SCALES, instead=rvc.latency_instead)
  snapshots = common.main(rvc.EXPERIMENT, rvc.plan, argv=argv, **kwargs)
  by_name = {s['run']: s for s in snapshots}
  assert sorted(by_name) == sorted([
      'random/macs0.50/s0/scratch', 'random/macs0.50/s0/reduced',
      'profile0/random_widths0.50/s0/scratch', 'l1/macs0.50/s0/finetune',
      'l1_random_channels/macs0.50/s0/finetune'])
  widths = {name: next(r for r in s['rows'] if r['stage'] == s['config']['regime'])['widths']
            for name, s in by_name.items()}
  # Own and random channels are fine-tuned at the same widths.
  assert (widths['l1/macs0.50/s0/finetune'] ==
          widths['l1_random_channels/macs0.50/s0/finetune'])
  assert len({json.dumps(w, sort_keys=True) for w in widths.values()}) == 4
  common.main(rvc.EXPERIMENT, rvc.plan, argv=argv + ['--latency'], **kwargs)
  latency = json.loads((root / rvc.EXPERIMENT / 'latency.json').read_text())
  timed = latency['runs']
  assert set(timed) == set(by_name)
  assert all(t['timed_macs'] == t['macs'] and t['ms_batch128'] > 0 for t in timed.values())
  # The network they were pruned from is timed beside them, with its full MACs.
  config = snapshots[0]['config']
  unpruned = latency['unpruned']
  assert list(unpruned) == [architecture_latency.unpruned_name(
      config['model'], config['width_multiplier'], config['dataset'])]
  full = next(iter(unpruned.values()))
  assert full['timed_macs'] == full['macs'] > max(t['macs'] for t in timed.values())
  assert full['ms_batch1'] > 0 and full['ms_batch128'] > 0
  report.build(str(root), str(tmp_path / 'tables'))
  table = (tmp_path / 'tables' / 'random_vs_criterion.md').read_text()
  unpruned_row = next(line for line in table.splitlines()
                      if line.startswith('| 1.00 | baseline | unpruned | 1 |'))
  assert unpruned_row.endswith(f"| {full['ms_batch1']:.2f} | {full['ms_batch128']:.2f} |")
  for cell in ('| 0.50 | scratch | uniform | 1 |', '| 0.50 | scratch | profile0 | 1 |',
               '| 0.50 | l1 | 1 |', 'fewer than two paired seeds'):
    assert cell in table, cell
  # The archive kept every result file as it was written, latency.json included: on a new
  # machine (an empty root) the same command restores them and retrains nothing, and the
  # tables built from the archive alone are the same.
  report.build(str(tmp_path / 'kept'), str(tmp_path / 'kept_tables'))
  for name in ('random_vs_criterion.md', 'random_vs_criterion_paired.csv'):
    assert ((tmp_path / 'tables' / name).read_bytes() ==
            (tmp_path / 'kept_tables' / name).read_bytes()), name
  fresh = [a if not a.startswith('--root=') else f"--root={tmp_path / 'new'}" for a in argv]
  capsys.readouterr()
  again = common.main(rvc.EXPERIMENT, rvc.plan, argv=fresh, **kwargs)
  out = capsys.readouterr().out
  assert out.count('finished, skipped') == 5 and 'running' not in out
  assert [s['rows'] for s in again] == [s['rows'] for s in snapshots]
  assert (tmp_path / 'new' / rvc.EXPERIMENT / 'latency.json').exists()
  assert not list((tmp_path / 'new').glob('baselines/*'))


def test_a_finished_run_made_with_other_settings_stops_the_runner_in_one_sentence(
    tmp_path, capsys):
  from experiments import random_vs_criterion as rvc
  argv = ['--scale=mini', '--model=tiny', '--dataset=digits', '--epochs=1', '--budgets=0.5',
          '--criteria=random', '--regimes=scratch', '--profiles=0', '--nouniform',
          '--channel_criteria=', '--seeds=0', f'--root={tmp_path}']
  kwargs = dict(extra_flags=rvc.extra_flags, scales=rvc.SCALES)
  run, = common.main(rvc.EXPERIMENT, rvc.plan, argv=argv + ['--dry_run'], **kwargs)
  stored = dict(run.config.__dict__, epochs=2)
  os.makedirs(run.config.workdir)
  with open(run.snapshot, 'w') as f:
    json.dump({'config': stored, 'rows': []}, f)
  with pytest.raises(SystemExit):
    common.main(rvc.EXPERIMENT, rvc.plan, argv=argv, **kwargs)
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f'error: {run.snapshot} is a finished run made with --epochs=2, not 1; give another '
      '--root (and --archive) for other settings.')


def test_an_archived_baseline_is_read_on_a_new_machine_instead_of_trained_again(
    tmp_path, capsys):
  from experiments import random_vs_criterion as rvc
  argv = ['--scale=mini', '--model=tiny', '--dataset=digits', '--epochs=1', '--criteria=random',
          '--regimes=scratch', '--profiles=0', '--nouniform', '--channel_criteria=',
          '--seeds=0', f"--archive={tmp_path / 'kept'}", '--archive_baselines']
  kwargs = dict(extra_flags=rvc.extra_flags, scales=rvc.SCALES)
  first, = common.main(rvc.EXPERIMENT, rvc.plan, **kwargs,
                       argv=argv + ['--budgets=0.5', f"--root={tmp_path / 'old'}"])
  kept, = (tmp_path / 'kept' / 'baselines').iterdir()
  assert sorted(p.name for p in kept.iterdir()) == [
      'final', 'metrics.jsonl', 'result.json', 'stage_config.json']
  # The kept variables name no path of the machine that made them (orbax's marker did).
  for path in (kept / 'final').rglob('*'):
    assert not path.is_file() or str(tmp_path).encode() not in path.read_bytes(), path
  capsys.readouterr()
  # A new machine: an empty root, the same archive, one more budget to run.
  again = common.main(rvc.EXPERIMENT, rvc.plan, **kwargs,
                      argv=argv + ['--budgets=0.5,0.3', f"--root={tmp_path / 'new'}"])
  out = capsys.readouterr().out
  assert '1 finished baselines restored' in out and out.count('finished, skipped') == 1
  baseline = tmp_path / 'new' / 'baselines' / kept.name
  assert not (baseline / 'checkpoints').exists()   # read, not trained
  rows = [{r['stage']: r for r in s['rows']}['baseline'] for s in (first, *again)]
  assert len({json.dumps(r, sort_keys=True) for r in rows}) == 1
  assert (tmp_path / 'kept' / rvc.EXPERIMENT / 'random' / 'macs0.30' / 's0' /
          'results_scratch.json').exists()


def test_a_baseline_is_archived_as_it_finishes_even_when_its_run_stops_later(
    tmp_path, monkeypatch, capsys):
  from experiments import random_vs_criterion as rvc
  from jaxprune.pipeline import stages

  def stopped(*args, **kwargs):
    raise KeyboardInterrupt   # Ctrl-C in the prune stage, after the baseline finished

  monkeypatch.setattr(stages, 'prune', stopped)
  with pytest.raises(SystemExit) as raised:
    common.main(rvc.EXPERIMENT, rvc.plan, extra_flags=rvc.extra_flags, scales=rvc.SCALES,
                argv=['--scale=mini', '--model=tiny', '--dataset=digits', '--epochs=1',
                      '--budgets=0.5', '--criteria=random', '--regimes=scratch',
                      '--profiles=0', '--nouniform', '--channel_criteria=', '--seeds=0',
                      f"--root={tmp_path / 'root'}", f"--archive={tmp_path / 'kept'}",
                      '--archive_baselines'])
  assert raised.value.code == 130
  kept, = (tmp_path / 'kept' / 'baselines').iterdir()
  assert (kept / 'result.json').exists() and (kept / 'final').is_dir()
  assert not list((tmp_path / 'kept').glob('random_vs_criterion/**/results_*.json'))


def test_archive_baselines_without_an_archive_is_one_sentence(tmp_path, capsys):
  from experiments import random_vs_criterion as rvc
  with pytest.raises(SystemExit):
    common.main(rvc.EXPERIMENT, rvc.plan, extra_flags=rvc.extra_flags, scales=rvc.SCALES,
                argv=['--scale=mini', '--model=tiny', '--dataset=digits', '--seeds=0',
                      '--archive_baselines', f'--root={tmp_path}'])
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      'error: --archive_baselines keeps the baselines in the --archive directory; give '
      '--archive=DIR too.')
  assert not list(tmp_path.iterdir())


def test_full_scale_plans_r_recipe_on_vgg16_and_resnet56_with_five_seeds(tmp_path):
  from experiments import random_vs_criterion as rvc
  runs = common.main(rvc.EXPERIMENT, rvc.plan, extra_flags=rvc.extra_flags, scales=rvc.SCALES,
                     argv=['--scale=full', f'--root={tmp_path}', '--dry_run'])
  assert {r.config.model for r in runs} == {'vgg16', 'resnet56'}
  assert {r.config.seed for r in runs} == {0, 1, 2, 3, 4}
  assert {(r.config.epochs, r.config.batch_size, r.config.lr, r.config.weight_decay,
           r.config.finetune_epochs, r.config.finetune_lr, r.config.dataset) for r in runs} == {
      (160, 64, 0.1, 1e-4, 40, 1e-3, 'cifar10')}
  assert {r.labels['architecture'] for r in runs} == {*rvc.CRITERIA, 'uniform', 'profile0',
                                                      'profile1'}
  assert list(tmp_path.iterdir()) == []


def test_bootstrap_interval_of_paired_differences_is_reproducible_and_within_their_range():
  by_seed = {0: 0.60, 1: 0.62, 2: 0.61}
  reference = {0: 0.50, 1: 0.55, 2: 0.52, 3: 0.9}   # seed 3 has no pair
  c = report.paired_difference(by_seed, reference)
  assert c['seeds'] == 3 and c['diff'] == pytest.approx((0.10 + 0.07 + 0.09) / 3)
  assert 0.07 - 1e-12 <= c['low'] < c['diff'] < c['high'] <= 0.10 + 1e-12
  assert report.paired_difference(by_seed, reference) == c
  assert c['p'] == report.paired_p_value(by_seed, reference)
  # A 99 % interval is at least as wide; one pair gives none.
  low, high = report.bootstrap_interval([by_seed[s] - reference[s] for s in range(3)],
                                        level=0.99)
  assert low <= c['low'] and high >= c['high']
  assert all(math.isnan(x) for x in report.bootstrap_interval([0.1]))


def _snapshot(root, criterion, budget, seed, regime, acc, channels=None):
  name = criterion if channels is None else f'{criterion}_{channels}_channels'
  workdir = root / 'random_vs_criterion' / name / f'macs{budget:.2f}' / f's{seed}'
  workdir.mkdir(parents=True, exist_ok=True)
  labels = {'criterion': criterion, 'budget': budget, 'seed': seed, 'regime': regime}
  if channels is not None:
    labels['channels'] = channels
  snap = {'experiment': 'random_vs_criterion', 'run': f'{name}/{budget}/{seed}/{regime}',
          'labels': labels,
          'config': {'model': 'tiny', 'width_multiplier': 1.0, 'dataset': 'digits', 'seed': seed,
                     'baseline_dir': f'b{seed}', 'selection': 'macs'},
          'rows': [{'stage': 'baseline', 'test_accuracy': 0.6 + 0.01 * seed, 'macs': 1000,
                    'params': 100, 'epochs': 3, 'wall_time_s': 1.0},
                   {'stage': 'pruned', 'test_accuracy': 0.1, 'macs': int(1000 * budget),
                    'params': 50, 'epochs': 0, 'wall_time_s': 1.0},
                   {'stage': regime, 'test_accuracy': acc, 'macs': int(1000 * budget),
                    'params': 50, 'epochs': 3, 'wall_time_s': 1.0 + seed}]}
  (workdir / f'results_{regime}.json').write_text(json.dumps(snap))


def test_a_study_with_no_reference_run_yet_says_so_instead_of_empty_tables(tmp_path):
  _snapshot(tmp_path / 'root', 'taylor', 0.5, 0, 'scratch', 0.6)
  report.build(str(tmp_path / 'root'), str(tmp_path / 'tables'))
  text = (tmp_path / 'tables' / 'random_vs_criterion.md').read_text()
  assert text.count(report.NO_PAIRS) == 2 and 'over 1 seed.' in text


def test_one_seed_verdict_names_the_largest_difference_of_either_sign(tmp_path):
  for criterion, acc in (('random', 0.50), ('taylor', 0.51), ('l1', 0.45)):
    _snapshot(tmp_path / 'root', criterion, 0.5, 0, 'scratch', acc)
  report.build(str(tmp_path / 'root'), str(tmp_path / 'tables'))
  verdict = (tmp_path / 'tables' / 'random_vs_criterion_verdict.csv').read_text()
  assert ('fewer than two paired seeds, so no interval; the largest single difference, '
          'l1 minus random, is -5.00 pp and says nothing beyond one draw.') in verdict


def test_channel_table_shows_accuracies_over_the_seeds_it_pairs(tmp_path):
  # Own channels have seeds 0 and 1, random channels only seed 0: every column of the row
  # speaks of seed 0 alone.
  for seed, acc in ((0, 0.80), (1, 0.84)):
    _snapshot(tmp_path / 'root', 'taylor', 0.5, seed, 'finetune', acc)
  _snapshot(tmp_path / 'root', 'taylor', 0.5, 0, 'finetune', 0.78, channels='random')
  report.build(str(tmp_path / 'root'), str(tmp_path / 'tables'))
  text = (tmp_path / 'tables' / 'random_vs_criterion.md').read_text()
  row = next(line for line in text.split('## Channels or widths?')[1].splitlines()
             if line.startswith('| 0.50 | taylor |'))
  assert row.startswith('| 0.50 | taylor | 1 | 80.00 | 78.00 | +2.00 |'), row


def test_paired_p_value_matches_the_t_distribution_by_hand():
  # Differences 0.10, 0.05, 0.10: t = mean / (sd / sqrt(3)) = 5 with 2 degrees of freedom,
  # whose two-sided p is 1 - t / sqrt(t^2 + 2) = 1 - 5 / sqrt(27).
  p = report.paired_p_value({0: 0.50, 1: 0.60, 2: 0.70}, {0: 0.40, 1: 0.55, 2: 0.60})
  assert p == pytest.approx(1 - 5 / 27 ** 0.5, rel=1e-9)
  # Only the seeds both sides ran are paired; fewer than two, or no variation, give NaN.
  assert p == report.paired_p_value({0: 0.50, 1: 0.60, 2: 0.70, 3: 0.1},
                                    {0: 0.40, 1: 0.55, 2: 0.60, 7: 0.9})
  assert math.isnan(report.paired_p_value({0: 0.5, 1: 0.6}, {0: 0.4, 2: 0.5}))
  assert math.isnan(report.paired_p_value({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5}))
  assert [report.p_text(x) for x in (p, 0.0004, float('nan'))] == ['0.038', '< 0.001', '-']


def test_report_rebuilds_identical_tables_from_results_alone(tmp_path):
  root = tmp_path / 'root'
  for seed in range(3):
    for budget in (0.3, 0.7):
      _snapshot(root, 'random', budget, seed, 'scratch', 0.50 + 0.01 * seed)
      _snapshot(root, 'taylor', budget, seed, 'scratch', 0.60 + 0.005 * seed)
      _snapshot(root, 'l1', budget, seed, 'scratch', 0.505 + 0.01 * seed)
  first, second = tmp_path / 'a', tmp_path / 'b'
  names = report.build(str(root), str(first))
  assert report.build(str(root), str(second)) == names
  tables = [n for n in names if n.endswith(('.md', '.csv'))]
  assert 'random_vs_criterion.md' in tables and 'random_vs_criterion.csv' in tables
  for name in tables:
    assert (first / name).read_bytes() == (second / name).read_bytes(), name
  paired = (first / 'random_vs_criterion_paired.csv').read_text().splitlines()
  # taylor - random per seed: 0.100, 0.095, 0.090, so t = 0.095 / (0.005 / sqrt(3)) and
  # p = 1 - t / sqrt(t^2 + 2) = 0.0009 (2 degrees of freedom); the bootstrap interval of
  # three differences lies within their range.
  taylor = [line.split(',') for line in paired if ',taylor,random,' in line]
  assert [row[:6] + row[8:] for row in taylor] == [
      ['0.70', 'scratch', 'taylor', 'random', '3', '0.0950', '0.0009'],
      ['0.30', 'scratch', 'taylor', 'random', '3', '0.0950', '0.0009']]
  assert all(0.09 <= float(row[6]) <= 0.095 <= float(row[7]) <= 0.10 for row in taylor)
  verdict = (first / 'random_vs_criterion_verdict.csv').read_text()
  # l1 - random is +0.5 pp at every seed: a zero-width interval but no t statistic, so it is
  # not called.
  assert ('At 70 % of the MACs (scratch, 3 seeds): taylor beats random: +9.50 pp '
          '[+9.00, +10.00], p < 0.001; the other difference is within what the seeds '
          'allow.') in verdict
  assert str(tmp_path) not in (first / 'random_vs_criterion.md').read_text()


def test_the_archived_results_rebuild_the_same_tables_without_the_work_directories(
    tmp_path, capsys):
  root = tmp_path / 'root'
  for seed in range(2):
    _snapshot(root, 'random', 0.5, seed, 'scratch', 0.50 + 0.01 * seed)
    _snapshot(root, 'taylor', 0.5, seed, 'scratch', 0.52 + 0.02 * seed)
  (root / 'random_vs_criterion' / 'latency.json').write_text(json.dumps({'runs': {}}))
  checkpoint = root / 'random_vs_criterion' / 'taylor' / 'ckpt' / 'state'
  checkpoint.parent.mkdir(parents=True)
  checkpoint.write_bytes(b'weights')
  kept = tmp_path / 'kept'
  report.main([f'--root={root}', f"--out={tmp_path / 'first'}", f'--archive={kept}'])
  assert capsys.readouterr().out.startswith(f'5 result files copied to {kept}\n')
  archived = sorted(str(p.relative_to(kept)) for p in kept.rglob('*') if p.is_file())
  assert archived == sorted(str(p.relative_to(root)) for p in root.rglob('*.json'))
  assert report.build(str(kept), str(tmp_path / 'second')) == report.build(
      str(root), str(tmp_path / 'third'))
  for name in ('random_vs_criterion.md', 'random_vs_criterion_paired.csv'):
    assert (tmp_path / 'first' / name).read_bytes() == (tmp_path / 'second' / name).read_bytes()


def _rethinking_snapshot(root, seed, regime, acc):
  workdir = root / 'rethinking' / 'l1' / f's{seed}'
  workdir.mkdir(parents=True, exist_ok=True)
  snap = {'experiment': 'rethinking', 'run': f'l1/s{seed}/{regime}', 'run_wall_time_s': 30.0,
          'labels': {'method': 'l1', 'preset': 'resnet8 0.5', 'seed': seed, 'regime': regime},
          'config': {'model': 'resnet8', 'seed': seed},
          'rows': [{'stage': 'baseline', 'test_accuracy': 0.60 + 0.02 * seed, 'macs': 1000,
                    'params': 100, 'epochs': 8},
                   {'stage': 'pruned', 'test_accuracy': 0.1, 'macs': 600, 'params': 40,
                    'epochs': 0},
                   {'stage': regime, 'test_accuracy': acc, 'macs': 600, 'params': 40,
                    'epochs': 8}]}
  (workdir / f'results_{regime}.json').write_text(json.dumps(snap))


def test_rethinking_table_has_one_column_per_regime(tmp_path):
  root = tmp_path / 'root'
  for seed in range(3):
    for regime, acc in (('finetune', 0.50), ('scratch', 0.55), ('scratch_b', 0.58),
                        ('lottery', 0.56)):
      _rethinking_snapshot(root, seed, regime, acc + 0.01 * seed)
  report.build(str(root), str(tmp_path / 'out'))
  text = (tmp_path / 'out' / 'rethinking.md').read_text()
  assert '12 runs; their wall times, as recorded in the snapshots, sum to 6.0 min' in text
  row = next(line for line in text.splitlines() if line.startswith('| l1 | resnet8 0.5 | 3 |'))
  # unpruned, MACs kept, params kept, then fine-tuned, scratch-E, scratch-B, lottery.
  assert row == ('| l1 | resnet8 0.5 | 3 | 62.00 ± 2.00 | 60.0 | 40.0 | 51.00 ± 1.00 | '
                 '56.00 ± 1.00 | 59.00 ± 1.00 | 57.00 ± 1.00 |')


def test_rethinking_compares_retrainings_with_a_paired_test_over_seeds(tmp_path):
  root = tmp_path / 'root'
  for seed, (finetune, scratch) in enumerate([(0.40, 0.50), (0.55, 0.60), (0.60, 0.70)]):
    _rethinking_snapshot(root, seed, 'finetune', finetune)
    _rethinking_snapshot(root, seed, 'scratch', scratch)
  report.build(str(root), str(tmp_path / 'out'))
  text = (tmp_path / 'out' / 'rethinking.md').read_text()
  # Differences 0.10, 0.05, 0.10 (the hand-made case of test_paired_p_value_...): p = 0.038.
  # Only the comparisons whose two regimes ran are listed.
  rows = [line for line in text.splitlines() if ' - fine-tuned |' in line or ' - scratch-E |' in line]
  assert rows == ['| l1 | resnet8 0.5 | scratch-E - fine-tuned | +8.33 | 0.038 |']


def _npz(path, per_class_counts):
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(per_class_counts)])
  np.savez(path, train_images=np.zeros((len(labels), 8, 8, 3), np.uint8), train_labels=labels,
           test_images=np.zeros((6, 8, 8, 3), np.uint8), test_labels=np.arange(6) % 3)
  return path


def test_subset_is_exactly_balanced_and_refuses_what_it_cannot_do(tmp_path, capsys):
  from experiments import subset
  source = _npz(tmp_path / 'source.npz', [5, 9, 4])
  out = tmp_path / 'subset.npz'
  subset.main([f'--data_path={source}', '--per_class=4', f'--out={out}'])
  written = np.load(out)
  assert np.bincount(written['train_labels']).tolist() == [4, 4, 4]
  assert len(written['test_labels']) == 6
  before = out.read_bytes()
  for flags, sentence in [
      ([f'--data_path={source}', '--per_class=4', f'--out={out}'], 'exists; remove it'),
      ([f'--data_path={source}', '--per_class=5', f"--out={tmp_path / 'b.npz'}"],
       '--per_class 5 exceeds the 4 training images of class 2.'),
      ([f"--data_path={tmp_path / 'none.npz'}", f"--out={tmp_path / 'c.npz'}"], 'does not exist'),
  ]:
    line = error_line(capsys, subset.main, flags)
    assert line.startswith('error: ') and sentence in line
  assert out.read_bytes() == before
  assert not (tmp_path / 'b.npz').exists() and not (tmp_path / 'c.npz').exists()


def _full_plan(name, tmp_path, *argv):
  module = importlib.import_module(f'experiments.{name}')
  return common.main(module.EXPERIMENT, module.plan, extra_flags=module.extra_flags,
                     argv=['--scale=full', f'--root={tmp_path}', '--dry_run', *argv],
                     scales=_scales(name))


def test_rethinking_full_rows_are_r_code_vgg16_a_mlp_init_shortcut_lottery(tmp_path):
  runs = _full_plan('rethinking', tmp_path, '--seeds=0')
  l1_vgg = [r.config for r in runs if r.config.preset == 'vgg16_a']
  assert l1_vgg and all((c.model, c.dense_init, c.bn_scale_init) ==
                        ('vgg16_mlp', 'normal_0.01', 0.5) for c in l1_vgg)
  code = {(r.config.model, r.config.bn_scale_init, r.config.dense_init,
           r.config.resnet_shortcut) for r in runs if r.config.granularity == 'channel'}
  assert code == {('vgg16_mlp', 0.5, 'normal_0.01', 'subsample'),
                  ('resnet56', 1.0, 'lecun_normal', 'avgpool_detached'),
                  ('resnet110', 1.0, 'lecun_normal', 'avgpool_detached'),
                  ('vgg19', 0.5, 'normal_0.01', 'subsample'),
                  ('preresnet164', 0.5, 'lecun_normal', 'subsample'),
                  ('densenet40', 0.5, 'lecun_normal', 'subsample')}
  assert {(r.labels['method'], r.config.lottery_style) for r in runs
          if r.config.regime == 'lottery'} == {('l1', 'mask'), ('slimming', 'slice')}


def test_rethinking_full_weight_level_rows_are_r_weight_level_code(tmp_path):
  runs = [r for r in _full_plan('rethinking', tmp_path, '--seeds=0')
          if r.config.granularity == 'weight']
  rows = {(r.config.model, r.config.prune_ratio, r.config.regime, r.config.bn_scale_init,
           r.config.dense_init) for r in runs}
  assert rows == {(model, ratio, regime, 1.0, 'normal_0.01' if model == 'vgg19' else
                   'lecun_normal')
                  for model in ('vgg19', 'preresnet110', 'densenet100_c')
                  for ratio in (0.3, 0.8) for regime in ('finetune', 'scratch', 'scratch_b')}
  for c in (r.config for r in runs):
    assert (c.criterion, c.selection, c.epochs, c.batch_size, c.lr, c.weight_decay,
            c.finetune_epochs, c.finetune_lr, c.scratch_b_cap, c.bn_l1) == (
                'l1', 'global', 160, 64, 0.1, 1e-4, 40, 1e-3, None, 0.0)


def test_crowley_full_trains_with_c_recipe(tmp_path):
  from jaxprune.pipeline import stages
  from jaxprune.train import optim
  runs = _full_plan('crowley', tmp_path, '--seeds=0')
  for run in runs:
    c = run.config
    assert (c.model, c.epochs, c.batch_size, c.lr, c.lr_decay_epochs, c.lr_decay_factor,
            c.weight_decay, c.pad_mode, c.finetune_lr, c.prune_every, c.prune_step) == (
                'wrn40_2', 200, 128, 0.1, '60,120,160', 0.2, 5e-4, 'reflect', 8e-4, 100, 1)
    assert c.finetune_batch_size is None  # fine-tunes at batch_size, 128
  assert {r.config.reduced_match for r in runs if r.config.regime == 'reduced'} == {'params'}
  rates = optim.learning_rates(stages.optimizer(runs[0].config), 200, 1)
  np.testing.assert_allclose(rates[[0, 59, 60, 119, 120, 160, 199]],
                             [0.1, 0.1, 0.02, 0.02, 0.004, 0.0008, 0.0008], rtol=1e-6)


def test_taylor_curves_full_fine_tunes_at_m_batch_and_lr(tmp_path):
  runs = _full_plan('taylor_curves', tmp_path, '--seeds=0')
  assert {(r.config.finetune_batch_size, r.config.finetune_lr, r.config.weight_decay)
          for r in runs} == {(32, 1e-4, 1e-4)}


def test_rethinking_methods_plans_only_those_rows(tmp_path, capsys):
  from experiments import rethinking
  argv = ['--scale=mini', f'--root={tmp_path}', '--dry_run', MINI_DATA, '--seeds=0']
  runs = common.main(rethinking.EXPERIMENT, rethinking.plan, extra_flags=rethinking.extra_flags,
                     argv=argv + ['--methods=weight'], scales=rethinking.SCALES)
  assert {r.config.granularity for r in runs} == {'weight'}
  assert sorted(r.config.regime for r in runs) == ['finetune', 'scratch', 'scratch_b']
  line = error_line(capsys, common.main, rethinking.EXPERIMENT, rethinking.plan,
                    extra_flags=rethinking.extra_flags, argv=argv + ['--methods=weights'],
                    scales=rethinking.SCALES)
  assert line == ("error: --methods 'weights' must be one or more of l1, slimming, weight, "
                  'comma-separated.')
