"""A tiny CNN for tests and quick starts: two prunable convs and a prunable hidden layer."""

from typing import Mapping

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.kernels.options import PerformanceOptions
from jaxprune.models import layers


class TinyCNN(layers.Network):
  num_classes: int = 10
  widths: Mapping[str, int] | None = None
  performance: PerformanceOptions = PerformanceOptions()

  def default_widths(self) -> dict[str, int]:
    return {'conv1': 8, 'conv2': 16, 'fc': 16}

  def prunable_groups(self) -> tuple[str, ...]:
    return ('conv1', 'conv2', 'fc')

  @nn.compact
  def __call__(self, x, train: bool = False, masks: Mapping | None = None):
    perf = self.performance
    widths = layers.resolve_widths('TinyCNN', self.default_widths(), self.widths)
    layers.check_masks(masks, widths, self.prunable_groups(), x.shape[0])
    x = layers.conv(perf, widths['conv1'], 3, name='conv1_conv')(x)
    x = nn.relu(layers.batch_norm(perf, train, name='conv1_bn')(x))
    x = layers.gate(self, x, masks, 'conv1')
    x = layers.conv(perf, widths['conv2'], 3, stride=2, name='conv2_conv')(x)
    x = nn.relu(layers.batch_norm(perf, train, name='conv2_bn')(x))
    x = layers.gate(self, x, masks, 'conv2')
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(widths['fc'], name='fc_dense')(x))
    x = layers.gate(self, x, masks, 'fc')
    return nn.Dense(self.num_classes, name='head')(x)
