"""The built-in models through the program-derived structure give what width probing gave.

tests/fixtures/builtin_reference.{npz,json} were recorded at commit 08a41c0 (by
tests/fixtures/record_builtin_reference.py, removed since: it called the width-probing
derivation), when structure came from probing `init` at other widths and the models
applied masks at gates of their own. Every
criterion's scores, every selection's masks, the costs and the masked and shrunk outputs
must stay what they were (scores to float rounding: the program runs the same arithmetic
in another order).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from builtin_reference import CHEAP_MODELS, IMAGE, MODELS, SELECTIONS, batches, variables_for
from jaxprune import models
from jaxprune.errors import ConfigError
from jaxprune.kernels.options import PerformanceOptions
from jaxprune.prune import criteria, flops, program, select, shrink

HERE = os.path.join(os.path.dirname(__file__), 'fixtures')


@pytest.fixture(scope='module')
def reference():
  with open(os.path.join(HERE, 'builtin_reference.json')) as f:
    meta = json.load(f)
  return meta, dict(np.load(os.path.join(HERE, 'builtin_reference.npz')))


def _setup(name):
  model = models.build(name, performance=PerformanceOptions(conv_impl='native'))
  return model, program.derive(model, IMAGE), variables_for(model)


@pytest.mark.parametrize('name', MODELS)
def test_structure_and_costs_are_unchanged(name, reference):
  meta, _ = reference
  structure = program.derive(models.build(name), IMAGE).structure
  assert dict(structure.widths) == meta[name]['widths']
  assert list(structure.prunable) == meta[name]['prunable']
  assert {'/'.join(k): n for k, n in structure.positions.items()} == meta[name]['positions']
  cost = flops.count(structure)
  assert [cost.macs, cost.params] == meta[name]['cost']


# The larger reference models take up to a minute each to score with every criterion or to
# select with every policy: the default run checks the smallest ones, -m slow the rest.
def _by_default(*names):
  return [n if n in names else pytest.param(n, marks=pytest.mark.slow) for n in MODELS]


@pytest.mark.parametrize('name', _by_default('tiny', 'resnet8'))
def test_every_criterion_scores_as_before(name, reference):
  meta, arrays = reference
  model, prog, variables = _setup(name)
  data = batches()
  names = [c for c in criteria.CRITERIA
           if c not in ('oracle', 'second_order') or name in CHEAP_MODELS]
  for criterion in names:
    if criterion in meta[name]['refused']:
      with pytest.raises(ConfigError):
        criteria.score(criterion, prog, variables, data, rng=jax.random.key(3))
      continue
    scores = criteria.score(criterion, prog, variables, data, rng=jax.random.key(3))
    for g in prog.structure.prunable:
      np.testing.assert_allclose(scores[g], arrays[f'{name}/scores/{criterion}/{g}'],
                                 rtol=2e-4, atol=1e-6, err_msg=f'{criterion} {g}')
  half = {g: (np.arange(w) % 2).astype(np.float32) for g, w in prog.structure.widths.items()
          if g in prog.structure.prunable}
  for criterion in ('taylor', 'mean_activation', 'fisher'):
    scores = criteria.score(criterion, prog, variables, data, masks=half)
    for g in prog.structure.prunable:
      np.testing.assert_allclose(scores[g], arrays[f'{name}/masked_scores/{criterion}/{g}'],
                                 rtol=2e-4, atol=1e-6, err_msg=f'{criterion} {g}')


@pytest.mark.parametrize('name', _by_default('tiny', 'resnet8', 'wrn10_1'))
def test_selections_costs_and_outputs_are_unchanged(name, reference):
  meta, arrays = reference
  model, prog, variables = _setup(name)
  structure = prog.structure
  taylor = {g: arrays[f'{name}/scores/taylor/{g}'] for g in structure.prunable}
  x = batches()[0]['image']
  for policy, options in SELECTIONS.items():
    masks = select.select(policy, structure, taylor, **options)
    for g in structure.prunable:
      np.testing.assert_array_equal(masks[g], arrays[f'{name}/masks/{policy}/{g}'])
    widths, small, _ = shrink.shrink(prog, variables, masks)
    expected = meta[name]['selections'][policy]
    assert widths == expected['widths']
    after = flops.count(structure, widths)
    assert [after.macs, after.params] == expected['cost']
    shrunk = model.clone(widths=widths).apply(small, x, train=False)
    np.testing.assert_allclose(shrunk, arrays[f'{name}/shrunk_output/{policy}'],
                               rtol=1e-4, atol=1e-5)
    masked = prog.apply(variables, x, masks={g: jnp.asarray(m) for g, m in masks.items()})
    np.testing.assert_allclose(masked, arrays[f'{name}/masked_output/{policy}'],
                               rtol=1e-4, atol=1e-5)
