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
  bn_scale_init: float = 1.0
  dense_init: str = 'lecun_normal'

  def default_widths(self) -> dict[str, int]:
    return {'conv1': 8, 'conv2': 16, 'fc': 16}

  def prunable_groups(self) -> tuple[str, ...]:
    return ('conv1', 'conv2', 'fc')

  def group_layers(self) -> dict[str, str]:
    return {'conv1': 'conv1_conv', 'conv2': 'conv2_conv', 'fc': 'fc_dense'}

  @nn.compact
  def __call__(self, x, train: bool = False):
    perf = self.performance
    widths = layers.resolve_widths('TinyCNN', self.default_widths(), self.widths)
    x = layers.conv(perf, widths['conv1'], 3, name='conv1_conv')(x)
    x = nn.relu(layers.batch_norm(perf, train, self.bn_scale_init, name='conv1_bn')(x))
    x = layers.conv(perf, widths['conv2'], 3, stride=2, name='conv2_conv')(x)
    x = nn.relu(layers.batch_norm(perf, train, self.bn_scale_init, name='conv2_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(layers.dense(widths['fc'], self.dense_init, name='fc_dense')(x))
    return layers.dense(self.num_classes, self.dense_init, name='head')(x)
