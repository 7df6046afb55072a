"""`jaxprune.Pruner` as a user meets it: the README's snippet runs as written, the criteria
and policies work on a derived structure, and wrong inputs are one clear sentence."""

import contextlib
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT
from jaxprune import Pruner
from jaxprune.errors import ConfigError
from jaxprune.prune import criteria
from random_variables import random_like


def _readme_snippet() -> str:
  text = (ROOT / 'README.md').read_text()
  section = text[text.index('### In your own code'):]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_readme_snippet_runs_as_written_in_under_15_lines():
  code = _readme_snippet()
  assert len(code.strip().splitlines()) < 15
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, 'README.md', 'exec'), {})
  assert out.getvalue().strip().endswith('(8, 10)')


class _Small(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(6, (3, 3), use_bias=False)(x)))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope='module')
def small():
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(4, 8, 8, 3)).astype(np.float32),
           'label': rng.integers(0, 10, 4).astype(np.int32)}
  variables = random_like(jax.eval_shape(_Small().init, jax.random.key(0), batch['image']))
  return Pruner(_Small().apply, variables, batch['image']), batch


def test_oracle_scores_are_the_loss_change_of_each_removal(small):
  pruner, batch = small
  scores = pruner.score('oracle', [batch])

  def loss(masks):
    logits = pruner.apply(pruner.variables, batch['image'], masks)
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean())

  full = {g: np.ones(w, np.float32) for g, w in pruner.structure.widths.items()}
  for g, w in pruner.structure.widths.items():
    brute = [abs(loss({**full, g: 1 - np.eye(w, dtype=np.float32)[k]}) - loss(full))
             for k in range(w)]
    np.testing.assert_allclose(scores[g], brute, rtol=1e-3, atol=1e-6)


def test_weight_criteria_and_a_macs_target(small):
  pruner, _ = small
  l1 = pruner.score('l1')
  kernel = np.asarray(pruner.variables['params']['Conv_0']['kernel'])
  np.testing.assert_allclose(l1['Conv_0'], np.abs(kernel).sum((0, 1, 2)), rtol=1e-6)
  assert set(pruner.score('random')) == set(pruner.structure.prunable)
  with pytest.raises(ConfigError, match="groups \\['Conv_1'\\] have no single BatchNorm"):
    pruner.score('bn_scale')
  masks = pruner.select('macs', l1, target_macs=0.5)
  assert pruner.cost(masks).macs <= 0.5 * pruner.cost().macs


def test_every_criterion_scores_a_model_of_ones_own(small):
  pruner, batch = small
  for name in criteria.CRITERIA:
    if name == 'bn_scale':
      with pytest.raises(ConfigError, match='no single BatchNorm'):
        pruner.score(name, [batch])
      continue
    scores = pruner.score(name, [batch], rng=jax.random.key(0))
    assert {g: s.shape for g, s in scores.items()} == {
        g: (w,) for g, w in pruner.structure.widths.items()}, name
    assert all(np.all(np.isfinite(s)) for s in scores.values()), name


def test_wrong_arguments_are_one_sentence(small):
  pruner, batch = small
  with pytest.raises(ConfigError, match='needs its variables'):
    Pruner(_Small().apply, None, batch['image'])
  with pytest.raises(ValueError, match="unknown group 'Dense_0'"):
    pruner.apply(pruner.variables, batch['image'], {'Dense_0': np.ones(10)})
