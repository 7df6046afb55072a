"""Every state file of a work directory, damaged: one sentence naming the file and what to do
(or, for what the run can compute again, a logged sentence and the same table), never a
traceback; a checkpoint of another structure is refused and left where it is."""

import gc
import json
import os
import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest

from conftest import QUICK, QUICK_FLAGS
from jaxprune import errors, pipeline
from jaxprune.train import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common, report  # noqa: E402


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished quick run (baseline, prune, scratch) and its results, made once."""
  work = tmp_path_factory.mktemp('finished') / 'work'
  return work, pipeline.run(pipeline.make(workdir=str(work), **QUICK, regime='scratch'))


@pytest.fixture
def damaged(finished, tmp_path):
  """A copy of the finished work directory in tmp_path/work, and its configuration."""
  shutil.copytree(finished[0], tmp_path / 'work')
  return tmp_path / 'work', pipeline.make(workdir=str(tmp_path / 'work'), **QUICK,
                                          regime='scratch')


def _rows(results):
  """The table's numbers (a stage computed again takes its own time)."""
  return [{k: v for k, v in row.items() if k != 'wall_time_s'} for row in results['rows']]


def _one_line(error) -> str:
  line = errors.as_flags(error)
  assert '\n' not in line, line
  return line


def _files(root) -> dict:
  return {p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()}


def _largest_data_file(variables):
  """The largest array data file of an orbax directory (tensorstore's OCDBT data)."""
  return max((p for p in variables.rglob('*') if p.is_file() and p.parent.name == 'd'),
             key=lambda p: p.stat().st_size)


def truncate(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def garbage(path):
  data = bytearray(path.read_bytes())
  quarter = len(data) // 4
  data[quarter:2 * quarter] = np.random.default_rng(0).bytes(quarter)
  path.write_bytes(bytes(data))


def delete(path):
  path.unlink()


def _quiet(capfd):
  """What the run printed on stderr, with what failed reads would print when collected."""
  gc.collect()
  err = capfd.readouterr().err
  for noise in ('Traceback', 'Exception ignored', 'never awaited'):
    assert noise not in err, err[-3000:]
  return err


# ------------------------------------------------- what the run computes again


@pytest.mark.parametrize('damage', [truncate, garbage, delete])
def test_damaged_prune_variables_are_computed_again_from_the_baseline(damaged, finished,
                                                                      damage, caplog, capfd):
  work, config = damaged
  damage(_largest_data_file(work / 'prune' / 'variables'))
  again = pipeline.run(config)
  assert _rows(again) == _rows(finished[1])
  said = [r.getMessage() for r in caplog.records if 'prune/variables' in r.getMessage()]
  assert len(said) == 1 and said[0].startswith(
      f'the variables in {work / "prune" / "variables"} do not restore (')
  assert said[0].endswith('). Computing the prune stage again from the baseline.')
  _quiet(capfd)
  checkpoint.load_variables(work / 'prune' / 'variables')  # restores again


@pytest.mark.parametrize('damage', [truncate, garbage])
def test_a_damaged_prune_record_is_computed_again_from_the_baseline(damaged, finished, damage,
                                                                    caplog, capfd):
  work, config = damaged
  record = json.loads((work / 'prune' / 'record.json').read_text())
  damage(work / 'prune' / 'record.json')
  again = pipeline.run(config)
  assert _rows(again) == _rows(finished[1])
  assert f'{work / "prune" / "record.json"} is damaged (' in caplog.text
  recomputed = json.loads((work / 'prune' / 'record.json').read_text())
  assert recomputed['masks'] == record['masks'] and recomputed['kept'] == record['kept']
  _quiet(capfd)


def test_damaged_initial_variables_are_made_again_from_the_model_and_seed(damaged, finished,
                                                                          caplog, capfd):
  work, config = damaged
  init = checkpoint.load_variables(work / 'baseline' / 'init')
  truncate(_largest_data_file(work / 'baseline' / 'init'))
  again = pipeline.run(config)
  assert _rows(again) == _rows(finished[1])
  assert 'Making them again from the model and seed.' in caplog.text
  jax.tree.map(np.testing.assert_array_equal,
               checkpoint.load_variables(work / 'baseline' / 'init'), init)
  _quiet(capfd)


@pytest.mark.parametrize('stage', ['baseline', 'scratch'])
def test_a_damaged_result_is_rebuilt_from_the_last_checkpoint(damaged, finished, stage, caplog,
                                                              capfd):
  work, config = damaged
  result = work / stage / 'result.json'
  expected = json.loads(result.read_text())
  truncate(result)
  again = pipeline.run(config)
  assert [r['test_accuracy'] for r in again['rows']] == [
      r['test_accuracy'] for r in finished[1]['rows']]
  assert f'{result} is damaged (' in caplog.text
  assert json.loads(result.read_text()) == expected
  _quiet(capfd)


# ------------------------------------------------- what only the user can decide


@pytest.mark.parametrize('stage', ['baseline', 'prune', 'scratch'])
def test_a_damaged_stage_config_is_one_sentence_and_the_advice_completes_the_run(
    damaged, finished, stage, capfd):
  work, config = damaged
  path = work / stage / 'stage_config.json'
  garbage(path)
  before = _files(work)
  with pytest.raises(errors.DataError) as raised:
    pipeline.run(config)
  line = _one_line(raised.value)
  assert line.startswith(f'{path} is damaged (')
  assert line.endswith(f'it records the settings {work / stage} was made with: if this '
                       "command's settings made it, delete the file and rerun (they are "
                       'recorded again), else use another --workdir (or --baseline_dir).')
  assert _files(work) == before
  path.unlink()
  again = pipeline.run(config)
  assert _rows(again) == _rows(finished[1])
  _quiet(capfd)


def test_a_damaged_variables_directory_through_launch_is_one_logged_sentence(finished, tmp_path,
                                                                             launch):
  work = tmp_path / 'work'
  shutil.copytree(finished[0], work)
  delete(_largest_data_file(work / 'prune' / 'variables'))
  run = launch(*QUICK_FLAGS, '--regime=scratch', workdir=work)
  assert run.returncode == 0, run.stderr[-3000:]
  for noise in ('Traceback', 'Exception ignored', 'never awaited', 'TensorStore'):
    assert noise not in run.stderr, run.stderr[-3000:]
  [said] = [line for line in run.stderr.splitlines() if 'prune/variables' in line]
  assert said.endswith('. Computing the prune stage again from the baseline.')
  assert json.loads((work / 'results.json').read_text())['rows'][2]['test_accuracy'] == (
      finished[1]['rows'][2]['test_accuracy'])


# ------------------------------------------------- another structure is not damage


def test_variables_of_another_structure_are_refused_in_one_sentence_and_left_alone(finished,
                                                                                   tmp_path):
  work = tmp_path / 'work'
  shutil.copytree(finished[0], work)
  before = _files(work)
  baseline = checkpoint.load_variables(work / 'baseline' / 'final')
  # The pruned network's variables restored into the baseline's shapes (as after a change to
  # the model's code): its conv2 has fewer channels.
  with pytest.raises(errors.ConfigError) as raised:
    checkpoint.load_variables(work / 'prune' / 'variables', like=baseline)
  assert not isinstance(raised.value, errors.DataError)
  line = _one_line(raised.value)
  assert line.startswith(f'{work / "prune" / "variables"} holds variables of another structure '
                         'than this code builds (batch_stats/conv2_bn/mean is float32[')
  assert 'nothing was moved or deleted' in line
  # A done stage's final/ the same: it stays done.
  with pytest.raises(errors.ConfigError):
    checkpoint.load_final(work / 'scratch', like=baseline)
  assert _files(work) == before


def test_a_checkpoint_of_another_structure_is_refused_naming_the_stage_and_left_alone(finished,
                                                                                      tmp_path):
  work = tmp_path / 'work'
  shutil.copytree(finished[0], work)
  before = _files(work)
  stage = work / 'scratch'
  checkpoints = checkpoint.RunCheckpoints(stage)
  state, _ = checkpoints.restore_latest(_saved_state(stage, checkpoints.latest_step()))
  widened = jax.tree_util.tree_map_with_path(
      lambda path, x: np.zeros((x.shape[0] + 1,) + x.shape[1:], x.dtype)
      if 'conv1_conv' in jax.tree_util.keystr(path) and x.ndim == 4 else x, state)
  with pytest.raises(errors.ConfigError) as raised:
    checkpoint.RunCheckpoints(stage).restore_latest(widened)
  line = _one_line(raised.value)
  step = checkpoints.latest_step()
  assert line.startswith(f'checkpoint {step} of stage {stage} holds variables of another '
                         'structure than this code builds (')
  assert 'conv1_conv/kernel is float32[3, 3, 1, 8] there, float32[4, 3, 1, 8] expected' in line
  assert _files(work) == before and not (stage / checkpoint.CORRUPT).exists()


def _saved_state(stage, step):
  """The saved training state of a checkpoint, restored as saved (no template)."""
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(stage / 'checkpoints' / str(step) / 'state')


def test_a_damaged_checkpoint_is_still_set_aside(finished, tmp_path):
  work = tmp_path / 'work'
  shutil.copytree(finished[0], work)
  stage = work / 'scratch'
  checkpoints = checkpoint.RunCheckpoints(stage)
  step = checkpoints.latest_step()
  like = _saved_state(stage, step)
  garbage(_largest_data_file(stage / 'checkpoints' / str(step) / 'state'))
  with pytest.raises(errors.DataError) as raised:
    checkpoint.RunCheckpoints(stage).restore_latest(like)
  assert _one_line(raised.value).startswith(f'no checkpoint of stage {stage} restores: ')
  assert (stage / checkpoint.CORRUPT / str(step)).exists()


# ------------------------------------------------- the report's snapshots


def test_a_damaged_snapshot_stops_the_report_in_one_sentence_and_its_rerun_mends_it(
    tmp_path, capfd):
  root = tmp_path / 'root'
  config = pipeline.make(workdir=str(root / 'quick' / 's0'), **QUICK, regime='scratch',
                         baseline_dir=str(root / 'baselines' / 'tiny-s0'))
  run = common.Run('taylor/s0/scratch', config,
                   {'method': 'taylor', 'preset': 'tiny 0.5', 'seed': 0, 'regime': 'scratch'})
  common.execute('rethinking', [run], log=lambda line: None)
  first = report.build(str(root), str(tmp_path / 'first'))
  snapshot = pathlib.Path(run.snapshot)
  truncate(snapshot)
  with pytest.raises(SystemExit) as stopped:
    report.main(['--root', str(root), '--out', str(tmp_path / 'second')])
  assert str(stopped.value).startswith(f'error: {snapshot} is damaged (JSONDecodeError: ')
  assert str(stopped.value).endswith('; delete it and rerun its experiment, which rewrites it '
                                     'from the finished stages.')
  assert '\n' not in str(stopped.value)
  snapshot.unlink()
  common.execute('rethinking', [run], log=lambda line: None)
  assert report.build(str(root), str(tmp_path / 'second')) == first
  tables = [name for name in first if name.endswith('.csv')]
  assert tables
  for name in tables:  # The Markdown also shows the rerun's own wall time.
    assert (tmp_path / 'first' / name).read_text() == (tmp_path / 'second' / name).read_text()
  _quiet(capfd)
