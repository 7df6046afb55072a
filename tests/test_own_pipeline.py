"""A researcher's own Flax model through the main job: `--model=package.module:factory`."""

import dataclasses
import json
import math
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from conftest import QUICK_FLAGS, ROOT, launch_command
from jaxprune import models, pipeline
from jaxprune.errors import ConfigError
from jaxprune.prune import program, shrink

REGIMES = ('finetune', 'scratch', 'scratch_b', 'lottery', 'reduced')


@pytest.mark.parametrize('factory', ['own_factories:nnx_factory', 'own_factories:linen_factory'])
def test_an_own_model_runs_every_regime(quick_config, factory):
  results = pipeline.run(quick_config(model=factory, criterion='taylor', regime='all',
                                      selection='global', prune_ratio=0.5))
  rows = {r['stage']: r for r in results['rows']}
  assert set(rows) == {'baseline', 'pruned', *REGIMES}
  for stage in ('pruned', 'finetune', 'scratch', 'scratch_b', 'lottery'):
    assert rows[stage]['macs'] == rows['pruned']['macs'] < rows['baseline']['macs']
  assert rows['reduced']['macs'] <= rows['pruned']['macs']
  assert all(0 <= r['test_accuracy'] <= 1 for r in rows.values())


def test_an_own_model_prunes_iteratively_and_by_weights(quick_config, tmp_path):
  factory = 'own_factories:linen_factory'
  iterative = pipeline.run(quick_config(
      model=factory, criterion='taylor', schedule='iterative', selection='global',
      prune_ratio=0.3, prune_every=2, regime='scratch', workdir=str(tmp_path / 'iterative')))
  rows = {r['stage']: r for r in iterative['rows']}
  assert rows['scratch']['macs'] < rows['baseline']['macs']
  weight = pipeline.run(quick_config(
      model=factory, granularity='weight', criterion='l1', selection='global', prune_ratio=0.5,
      regime='scratch', workdir=str(tmp_path / 'weight')))
  rows = {r['stage']: r for r in weight['rows']}
  assert rows['scratch']['macs'] < rows['baseline']['macs']


def test_a_fresh_pruned_kernel_has_its_initializers_spread_at_the_pruned_shape():
  # Linen's Dense draws lecun_normal: std 1/sqrt(fan_in). Pruned from 512 inputs to 64, a
  # sliced kernel keeps the full fan-in's spread unless rescaled.
  model = models.build('own_factories:wide_factory', 10, image_shape=(4, 4, 1))
  prog = program.derive(model, (4, 4, 1))
  masks = {g: (np.arange(w) < 64).astype(np.float32) for g, w in prog.structure.widths.items()}
  _, _, kept = shrink.shrink(prog, model.init(jax.random.key(0), np.zeros((1, 4, 4, 1))), masks)
  fresh = models.init(model.with_kept(kept), jax.random.key(1), (4, 4, 1))
  kernel = np.asarray(fresh['params']['head']['kernel'])
  assert kernel.shape == (64, 256)
  # The initializer's own spread at (64, 256): 1/sqrt(64); the full fan-in's is 1/sqrt(512).
  expected = float(np.std(jax.nn.initializers.lecun_normal()(jax.random.key(2), (64, 256))))
  assert math.isclose(expected, 1 / 8, rel_tol=0.03)
  assert math.isclose(float(np.std(kernel)), expected, rel_tol=0.03)


def test_an_edited_model_is_a_new_baseline_not_a_reused_one(quick_config, tmp_path,
                                                             monkeypatch):
  import own_factories
  config = quick_config(model='own_factories:linen_factory', regime='scratch',
                        baseline_dir=str(tmp_path / 'base'))
  pipeline.run(config)
  monkeypatch.setattr(own_factories, 'linen_factory', own_factories.linen_wider_factory)
  models.own._cached_template.cache_clear()
  program.derive.cache_clear()
  with pytest.raises(ConfigError, match='trained on another version of the model'):
    pipeline.run(dataclasses.replace(config, workdir=str(tmp_path / 'other')))


@pytest.mark.parametrize('model,message', [
    ('own_factories:no_such', "own_factories has no function 'no_such'"),
    ('no_such_module:factory', 'cannot import no_such_module'),
    ('own_factories:not_a_model', 'returned a dict, not a Flax NNX or Linen module'),
])
def test_a_factory_that_is_not_there_or_not_a_model_is_one_sentence(quick_config, model,
                                                                    message, tmp_path):
  with pytest.raises(ConfigError, match=message) as error:
    pipeline.run(quick_config(model=model, regime='scratch'))
  assert '\n' not in str(error.value)
  assert not (tmp_path / 'work').exists()


@pytest.mark.parametrize('settings,message', [
    ({'selection': 'preset', 'preset': 'vgg16_a', 'prune_ratio': None},
     'preset .vgg16_a. is for vgg16'),
    ({'width_multiplier': 0.5}, "width_multiplier shapes the built-in models' layers"),
])
def test_settings_of_the_built_in_models_refuse_an_own_one(quick_config, settings, message):
  with pytest.raises(ConfigError, match=message):
    pipeline.run(quick_config(model='own_factories:nnx_factory', regime='scratch', **settings))


@pytest.mark.slow
@pytest.mark.parametrize('factory', ['examples.mobilenet_v2:factory', 'examples.resnext:factory'])
def test_sigkill_twice_then_rerun_gives_the_uninterrupted_table(tmp_path, launch, factory):
  flags = [f'--model={factory}', '--epochs=2', '--batch_size=32', '--max_train=512',
           '--regime=all', '--finetune_epochs=2']
  reference = launch(*flags, workdir=tmp_path / 'reference')
  assert reference.returncode == 0, reference.stderr[-2000:]
  expected = json.loads((tmp_path / 'reference' / 'results.json').read_text())['rows']
  workdir = tmp_path / 'killed'
  for delay in (12, 25):
    proc = subprocess.Popen(launch_command(*flags, workdir=workdir), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  resumed = launch(*flags, workdir=workdir)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  got = json.loads((workdir / 'results.json').read_text())['rows']
  assert [(r['stage'], r['test_accuracy'], r['macs']) for r in got] == [
      (r['stage'], r['test_accuracy'], r['macs']) for r in expected]


@pytest.mark.slow
def test_two_processes_train_an_own_model_as_one_process_on_two_devices(tmp_path):
  from jaxprune import local_cluster
  from test_multihost import ATOL, accuracies, run_cluster
  flags = ('--model=tests.own_factories:nnx_factory', *QUICK_FLAGS, '--regime=all',
           '--multihost_timeout=30')
  two = run_cluster(*flags, workdir=tmp_path / 'two', log_dir=tmp_path / 'logs')
  assert two.returncode == 0, two.stderr[-3000:]
  one = subprocess.run(launch_command(*flags, workdir=tmp_path / 'one'), capture_output=True,
                       text=True, cwd=ROOT, timeout=900, env=local_cluster.environment(2))
  assert one.returncode == 0, one.stderr[-3000:]
  np.testing.assert_allclose(list(accuracies(tmp_path / 'two').values()),
                             list(accuracies(tmp_path / 'one').values()), atol=ATOL)
