"""A tiny CNN for tests and quick starts: two prunable convs and a prunable hidden layer."""

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.models import layers


class TinyCNN(layers.Network):
  def default_widths(self) -> dict[str, int]:
    return {'conv1': 8, 'conv2': 16, 'fc': 16}

  def group_layers(self) -> dict[str, str]:
    return {'conv1': 'conv1_conv', 'conv2': 'conv2_conv', 'fc': 'fc_dense'}

  @nn.compact
  def __call__(self, x, train: bool = False):
    widths = self.resolved_widths()
    x = self.conv(widths['conv1'], 3, name='conv1_conv')(x)
    x = nn.relu(self.batch_norm(train, 'conv1_bn')(x))
    x = self.conv(widths['conv2'], 3, stride=2, name='conv2_conv')(x)
    x = nn.relu(self.batch_norm(train, 'conv2_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(layers.dense(widths['fc'], self.dense_init, name='fc_dense')(x))
    return layers.dense(self.num_classes, self.dense_init, name='head')(x)
