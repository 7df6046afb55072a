"""Divergence a rerun can mend: a run stops when its loss or parameters stop being finite or
its loss explodes, keeps only healthy checkpoints, records nothing of the diverged stage as
done, and the advised rerun with a smaller learning rate finishes the job."""

import dataclasses
import json
import subprocess

import numpy as np
import pytest

from conftest import QUICK_FLAGS, launch_command
from jaxprune import data, errors, models, pipeline, train
from jaxprune.pipeline import stages
from jaxprune.train import checkpoint, loop
from test_train import numpy_variables


def _run(*flags, workdir):
  return subprocess.run(launch_command(*flags, workdir=workdir), capture_output=True, text=True,
                        timeout=600)


@pytest.mark.slow  # Two launch.py runs: about 25 s.
def test_lr_1000_stops_in_one_sentence_and_the_advised_rerun_finishes_the_table(tmp_path):
  # A constant rate: a one-epoch step schedule would start at lr / 100.
  flags = (*QUICK_FLAGS, '--lr_schedule=constant', '--regime=scratch')
  diverged = _run(*flags, '--lr=1000', workdir=tmp_path)
  assert diverged.returncode == errors.EXIT_STATUS[errors.Diverged] == 3, diverged.stderr[-2000:]
  assert 'Traceback' not in diverged.stderr
  line = diverged.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: training diverged in stage {tmp_path / 'baseline'}: the "
                         'training loss is ')
  assert line.endswith('rerunning with a smaller lr starts the stage again.')
  assert not (tmp_path / 'baseline' / checkpoint.RESULT).exists()
  assert (tmp_path / 'baseline' / checkpoint.DIVERGED).exists()
  rerun = _run(*flags, '--lr=0.1', workdir=tmp_path)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  table = rerun.stdout.splitlines()
  assert [row.split()[0] for row in table[2:5]] == ['baseline', 'pruned', 'scratch']
  assert not (tmp_path / 'baseline' / checkpoint.DIVERGED).exists()


def test_an_exploding_finite_loss_stops_the_stage_which_is_not_recorded_done(quick_config,
                                                                             tmp_path):
  # lr 100 keeps the loss finite (it grows to hundreds, or 1e29); the explosion rule stops it.
  config = quick_config(lr=100.0, lr_schedule='constant', regime='scratch')
  with pytest.raises(errors.Diverged) as raised:
    pipeline.run(config)
  limit = loop.loss_limit(10)
  assert raised.value.reason.startswith('the training loss is ')
  assert f'above {limit:.3g} (10 x ln of the 10 classes)' in raised.value.reason
  stage = tmp_path / 'work' / 'baseline'
  assert not checkpoint.is_done(stage) and not (tmp_path / 'work' / 'prune').exists()
  assert checkpoint.read_diverged(stage)['learning_rate'] == 100.0
  results = pipeline.run(dataclasses.replace(config, lr=0.05))
  assert [r['stage'] for r in results['rows']] == ['baseline', 'pruned', 'scratch']
  assert checkpoint.is_done(stage) and checkpoint.read_diverged(stage) is None
  assert json.loads((stage / 'stage_config.json').read_text())['lr'] == 0.05


class StopAfterEpoch(Exception):
  pass


def stop_after_epoch(state, record):
  raise StopAfterEpoch()


def test_a_stage_diverging_after_a_healthy_epoch_resumes_from_that_epochs_checkpoint(tmp_path):
  ds = data.load('digits')
  model = models.build('tiny', num_classes=ds.num_classes)
  arrays = data.device_put_dataset(ds)
  variables = numpy_variables(model, ds.image_shape)

  def train_stage(learning_rate, **fit_args):
    options = train.TrainOptions(epochs=2, batch_size=64, optimizer=train.OptimizerConfig(
        learning_rate=learning_rate, schedule='constant'))
    if fit_args:
      return train.fit(model, variables, arrays, ds.spec, options, stage_dir=tmp_path,
                       **fit_args)
    return stages.train_stage(tmp_path, model, variables, arrays, ds.spec, options, seed=0,
                              record={})

  with pytest.raises(StopAfterEpoch):  # One healthy epoch (22 steps): its checkpoint.
    train_stage(0.05, callbacks=[stop_after_epoch])
  [first_epoch] = checkpoint.read_metrics(tmp_path)
  with pytest.raises(errors.Diverged) as diverged:
    train_stage(1000.0)
  error = diverged.value
  assert error.stage == str(tmp_path) and error.resume_step == 22
  assert error.epoch == 2 and 22 < error.step <= 44
  assert f'at epoch 2, step {error.step}; the healthy checkpoint of step 22 is kept' in str(error)
  assert checkpoint.RunCheckpoints(tmp_path).latest_step() == 22
  assert checkpoint.read_metrics(tmp_path) == [first_epoch]
  assert checkpoint.read_diverged(tmp_path) == {
      'epoch': 2, 'step': error.step, 'resume_step': 22, 'learning_rate': 1000.0}
  assert not checkpoint.is_done(tmp_path)
  _, result = train_stage(0.05)
  assert result['steps'] == 44 and result['train_loss'] < loop.loss_limit(ds.num_classes)
  assert checkpoint.is_done(tmp_path) and checkpoint.read_diverged(tmp_path) is None
  assert checkpoint.read_metrics(tmp_path)[0] == first_epoch


def test_parameters_that_stop_being_finite_stop_the_run_before_they_are_saved(tmp_path):
  ds = data.load('digits', max_train=256)
  model = models.build('tiny', num_classes=ds.num_classes)
  variables = numpy_variables(model, ds.image_shape)
  # A NaN BN statistic: the training loss stays finite (batch statistics), the state is not.
  stats = variables['batch_stats']['conv1_bn']
  stats['mean'] = np.full_like(stats['mean'], np.nan)
  options = train.TrainOptions(epochs=1, batch_size=64)
  with pytest.raises(errors.Diverged) as diverged:
    train.fit(model, variables, data.device_put_dataset(ds), ds.spec, options,
              stage_dir=tmp_path)
  assert diverged.value.reason == 'the parameters or BN statistics are not finite'
  assert (diverged.value.epoch, diverged.value.step, diverged.value.resume_step) == (1, 4, 0)
  assert checkpoint.RunCheckpoints(tmp_path).latest_step() is None
