"""Spearman rank agreement between criteria, per layer and pooled."""

import warnings

import numpy as np
import pytest
from scipy import stats

from jaxprune.prune import agreement
from jaxprune.errors import ConfigError


def test_identical_rankings_agree_perfectly_and_reversed_ones_disagree():
  a = {'l1': [0.1, 0.5, 0.3], 'l2': [2.0, 1.0, 3.0, 4.0]}
  b = {'l1': [1, 5, 3], 'l2': [-4.0, -3.0, -2.0, -1.0]}
  rho = agreement.per_layer(a, b)
  assert rho['l1'] == pytest.approx(1.0)
  assert rho['l2'] == pytest.approx(stats.spearmanr(a['l2'], b['l2']).statistic)
  assert agreement.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_constant_scores_give_nan_without_a_warning():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert np.isnan(agreement.spearman([0.0, 0.0, 0.0], [1, 2, 3]))
    assert np.isnan(agreement.spearman([1.0], [2.0]))


def test_mean_per_layer_skips_undefined_layers():
  result = agreement.agreement({'a': [1, 2, 3], 'b': [0, 0, 0]}, {'a': [1, 2, 3], 'b': [1, 2, 3]})
  assert np.isnan(result.per_layer['b'])
  assert result.mean_per_layer == pytest.approx(1.0)


def test_pooled_rho_uses_per_layer_l2_normalisation():
  # Same ranking within each layer, but layer scales differ between the criteria.
  a = {'x': np.array([1.0, 2.0, 3.0]), 'y': np.array([10.0, 20.0, 40.0])}
  b = {'x': np.array([100.0, 200.0, 300.0]), 'y': np.array([1.0, 2.0, 4.0])}
  assert agreement.across_layers(a, b, normalize=True) == pytest.approx(1.0)
  raw = agreement.across_layers(a, b, normalize=False)
  assert raw == pytest.approx(stats.spearmanr(np.r_[a['x'], a['y']],
                                              np.r_[b['x'], b['y']]).statistic)
  assert raw < 0.5


def test_masks_restrict_agreement_to_live_channels():
  a = {'x': [1.0, 2.0, 3.0, 0.0]}
  b = {'x': [1.0, 2.0, 3.0, 9.0]}
  assert agreement.per_layer(a, b)['x'] < 1
  assert agreement.per_layer(a, b, masks={'x': [1, 1, 1, 0]})['x'] == pytest.approx(1.0)


@pytest.mark.parametrize('a,b,message', [
    ({'x': [1, 2]}, {'y': [1, 2]}, 'different groups'),
    ({'x': [1, 2]}, {'x': [1, 2, 3]}, 'shapes'),
])
def test_criteria_scoring_different_channels_are_a_bug_not_a_config_error(a, b, message):
  with pytest.raises(ValueError, match=message) as info:
    agreement.per_layer(a, b)
  assert not isinstance(info.value, ConfigError)
