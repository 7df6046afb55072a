"""Resumable stages: a crash or a preemption changes no result; a done stage is not redone
(divergence: test_divergence.py)."""

import functools
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxprune import data, errors, train
from jaxprune.pipeline import stages
from jaxprune.train import checkpoint
from test_train import learnable_dataset, python_process, tiny, two_copies

EPOCHS, BATCH = 3, 32  # 8 steps per epoch on the 256 training images.
OPTIONS = train.TrainOptions(epochs=EPOCHS, batch_size=BATCH, optimizer=train.OptimizerConfig(
    learning_rate=0.05, weight_decay=1e-3))


class Crash(Exception):
  pass


@jax.jit
def _prune_every_5_steps(step, masks, removed):
  """Iterative pruning on device: every 5 steps remove the next conv2 channel."""
  prune = step % 5 == 0
  conv2 = jnp.where(prune, masks['conv2'].at[removed].set(0.0), masks['conv2'])
  return {**masks, 'conv2': conv2}, removed + prune.astype(jnp.int32)


def pruning_hook(state, batch, masks, removed):
  del batch
  return _prune_every_5_steps(state.step, masks, removed)


def crash_at(step, action):
  """A pruning hook that performs `action` after `step` steps of this process."""
  calls = []

  def hook(state, batch, masks, removed):
    calls.append(1)
    if len(calls) == step:
      action()
    return pruning_hook(state, batch, masks, removed)

  return hook


@functools.cache
def problem():
  ds = learnable_dataset()
  return ds, data.device_put_dataset(ds)


def run_fit(stage_dir, step_hook=pruning_hook, callbacks=()):
  """`fit` in a pipeline stage: final/ and result.json written at the end."""
  ds, arrays = problem()
  model, struct, variables = tiny()
  masks = {g: jnp.ones(w) for g, w in struct.widths.items() if g in struct.prunable}
  return stages.train_stage(stage_dir, model, variables, arrays, ds.spec, OPTIONS, seed=7,
                            record={}, masks=masks, structure=struct, step_hook=step_hook,
                            hook_state=jnp.zeros((), jnp.int32), callbacks=callbacks)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  stage = tmp_path_factory.mktemp('uninterrupted')
  variables, result = run_fit(stage)
  return stage, jax.device_get(variables), result


def assert_same_run(stage, variables, result, expected_stage, expected_variables, expected_result):
  assert result['test_accuracy'] == expected_result['test_accuracy']
  assert result['test_loss'] == expected_result['test_loss']
  assert result['steps'] == expected_result['steps'] == EPOCHS * 8
  flat, expected = (traverse_util.flatten_dict(jax.device_get(v))
                    for v in (variables, expected_variables))
  for key in expected:
    np.testing.assert_array_equal(flat[key], expected[key], err_msg=str(key))
  timing = ('elapsed_s', 'images_per_second')
  strip = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]
  assert strip(checkpoint.read_metrics(stage)) == strip(checkpoint.read_metrics(expected_stage))


def test_fit_resumed_after_crash_matches_uninterrupted_fit(tmp_path, uninterrupted):
  def crash():
    raise Crash()

  with pytest.raises(Crash):
    run_fit(tmp_path, step_hook=crash_at(12, crash))  # Mid-epoch 2.
  assert checkpoint.RunCheckpoints(tmp_path).latest_step() == 8
  assert not checkpoint.is_done(tmp_path)
  variables, result = run_fit(tmp_path)
  assert_same_run(tmp_path, variables, result, *uninterrupted)


@pytest.mark.parametrize('step', [13, 16])  # Mid epoch 2; the last step of epoch 2.
def test_fit_resumed_after_preemption_matches_uninterrupted_fit(tmp_path, uninterrupted, step):
  with pytest.raises(errors.Preempted) as preempted, checkpoint.SIGNALS.installed():
    run_fit(tmp_path, step_hook=crash_at(step, lambda: os.kill(os.getpid(), signal.SIGTERM)))
  assert checkpoint.RunCheckpoints(tmp_path).latest_step() == step == preempted.value.step
  variables, result = run_fit(tmp_path)
  assert_same_run(tmp_path, variables, result, *uninterrupted)


def test_sigterm_in_the_last_step_finishes_the_stage_then_stops(tmp_path, uninterrupted):
  with pytest.raises(errors.Preempted) as preempted, checkpoint.SIGNALS.installed():
    run_fit(tmp_path, step_hook=crash_at(EPOCHS * 8, lambda: os.kill(os.getpid(), signal.SIGTERM)))
  assert preempted.value.step == EPOCHS * 8
  assert checkpoint.is_done(tmp_path)
  variables, result = run_fit(tmp_path)   # Done: loaded, not trained again.
  assert_same_run(tmp_path, variables, result, *uninterrupted)


def test_finished_stage_is_skipped_on_rerun(uninterrupted):
  stage, expected_variables, expected_result = uninterrupted
  written = (stage / checkpoint.RESULT).stat().st_mtime_ns

  def never(*args):
    raise AssertionError('a finished stage trained again')

  variables, result = run_fit(stage, step_hook=never, callbacks=[never])
  assert result == expected_result == checkpoint.read_result(stage)
  assert (stage / checkpoint.RESULT).stat().st_mtime_ns == written
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), expected_variables)


def run_copies(root):
  ds, arrays = problem()
  model, inits, seeds = two_copies()
  return stages.train_stage_copies(model, inits, arrays, ds.spec, OPTIONS,
                                   stage_dirs=[root / 'a', root / 'b'], seeds=seeds,
                                   checkpoint_dir=root / 'group', record={})


def crash_after_first_call(monkeypatch, name):
  """Makes checkpoint.<name> do its work once, then raise Crash; returns the undo."""
  original = getattr(checkpoint, name)

  def crash(*args):
    original(*args)
    raise Crash()

  monkeypatch.setattr(checkpoint, name, crash)
  return lambda: monkeypatch.setattr(checkpoint, name, original)


def assert_same_copies(root, resumed, expected_root, expected):
  for name, (variables, result), (expected_variables, expected_result) in zip(
      'ab', resumed, expected):
    assert_same_run(root / name, variables, result, expected_root / name, expected_variables,
                    expected_result)


def test_fit_copies_resumed_after_crash_match_uninterrupted_copies(tmp_path, monkeypatch):
  expected = run_copies(tmp_path / 'uninterrupted')
  undo = crash_after_first_call(monkeypatch, 'write_metrics')  # After epoch 1's checkpoint.
  with pytest.raises(Crash):
    run_copies(tmp_path / 'crashed')
  undo()
  group = tmp_path / 'crashed' / 'group' / 'copies-3-4'
  assert checkpoint.RunCheckpoints(group).latest_step() == 8
  resumed = run_copies(tmp_path / 'crashed')
  assert_same_copies(tmp_path / 'crashed', resumed, tmp_path / 'uninterrupted', expected)


def test_fit_copies_stopped_between_copies_final_writes_finishes_the_rest(tmp_path, monkeypatch):
  expected = run_copies(tmp_path / 'uninterrupted')
  undo = crash_after_first_call(monkeypatch, 'mark_done')  # After copy a's result.json.
  with pytest.raises(Crash):
    run_copies(tmp_path / 'crashed')
  undo()
  assert checkpoint.is_done(tmp_path / 'crashed' / 'a')
  assert not checkpoint.is_done(tmp_path / 'crashed' / 'b')
  written = (tmp_path / 'crashed' / 'a' / checkpoint.RESULT).stat().st_mtime_ns
  resumed = run_copies(tmp_path / 'crashed')
  assert (tmp_path / 'crashed' / 'a' / checkpoint.RESULT).stat().st_mtime_ns == written
  assert_same_copies(tmp_path / 'crashed', resumed, tmp_path / 'uninterrupted', expected)


def test_result_is_never_overwritten(tmp_path):
  checkpoint.mark_done(tmp_path, {'test_accuracy': 0.5})
  with pytest.raises(FileExistsError):
    checkpoint.mark_done(tmp_path, {'test_accuracy': 0.9})
  assert checkpoint.read_result(tmp_path) == {'test_accuracy': 0.5}


# Trains the stage in argv[1], writing how many steps this process has taken to
# 'progress' and sleeping between steps (when argv[2] is 'slow'), so that a signal
# can be sent at a chosen point of training.
RUN_STAGE = """
import sys, time
from pathlib import Path
from jaxprune import errors
from jaxprune.train import checkpoint
import test_checkpoint

stage, slow = Path(sys.argv[1]), sys.argv[2] == 'slow'
steps = 0

def hook(state, batch, masks, removed):
  global steps
  steps += 1
  # Written aside and renamed, so a reader (or a kill) never finds the file half-written.
  (stage / 'progress.tmp').write_text(str(steps))
  (stage / 'progress.tmp').replace(stage / 'progress')
  if slow:
    time.sleep(0.05)
  return test_checkpoint.pruning_hook(state, batch, masks, removed)

with errors.exit_on_user_error(), checkpoint.SIGNALS.installed():
  test_checkpoint.run_fit(stage, step_hook=hook)
print('finished without preemption')
"""


def run_stage(stage, slow=False):
  return python_process(RUN_STAGE, str(stage), 'slow' if slow else 'fast')


def signal_after(proc, stage, steps, sig):
  """Sends `sig` to `proc` once it has taken `steps` steps; returns (returncode, stdout, stderr)."""
  progress = stage / 'progress'
  deadline = time.time() + 120
  while not (progress.exists() and int(progress.read_text()) >= steps):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.01)
  proc.send_signal(sig)
  stdout, stderr = proc.communicate(timeout=120)
  return proc.returncode, stdout, stderr


def test_sigterm_saves_at_next_step_and_exits_75(tmp_path):
  returncode, stdout, stderr = signal_after(run_stage(tmp_path, slow=True), tmp_path, 3,
                                            signal.SIGTERM)
  assert returncode == errors.EXIT_STATUS[errors.Preempted] == 75, stderr[-3000:]
  assert 'finished without preemption' not in stdout
  step = checkpoint.RunCheckpoints(tmp_path).latest_step()
  assert 3 <= step < EPOCHS * 8
  assert str(errors.Preempted(step, str(tmp_path))) in stderr.splitlines()
  assert 'Traceback' not in stderr
  assert not checkpoint.is_done(tmp_path)


@pytest.mark.slow
# Killed during epoch 1's evaluation and checkpoint, and mid epoch 3.
@pytest.mark.parametrize('steps', [8, 19])
def test_kill9_then_rerun_matches_uninterrupted_fit(tmp_path, uninterrupted, steps):
  returncode, _, stderr = signal_after(run_stage(tmp_path, slow=True), tmp_path, steps,
                                       signal.SIGKILL)
  assert returncode == -signal.SIGKILL, stderr[-3000:]
  assert not checkpoint.is_done(tmp_path)
  killed_at = int((tmp_path / 'progress').read_text())
  proc = run_stage(tmp_path)
  stdout, stderr = proc.communicate(timeout=180)
  assert proc.returncode == 0, stderr[-3000:]
  assert 'finished without preemption' in stdout
  # Lost: the epoch cut short and at most the one before it, if its checkpoint was
  # still being written.
  resumed_at = EPOCHS * 8 - int((tmp_path / 'progress').read_text())
  assert resumed_at >= (killed_at // 8 - 1) * 8, (killed_at, resumed_at)
  variables = checkpoint.load_variables(tmp_path / checkpoint.FINAL)
  assert_same_run(tmp_path, variables, checkpoint.read_result(tmp_path), *uninterrupted)
