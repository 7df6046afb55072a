"""VGG for CIFAR-sized images, built from a layer list and a widths mapping.

Conv groups are named `conv{stage}_{index}` (stage counted between max-pools,
both from 1), so VGG-16's are conv1_1 ... conv5_3 as in the pruning literature.
Every conv is followed by BN and ReLU and is prunable. The feature map is
global-average pooled (the same as the reference 2x2 average pool at 32x32).

Classifiers: 'linear' is one Dense layer (network slimming's VGG); 'mlp' is
Dense(fc) -> BN -> ReLU -> Dense (L1-norm filter pruning's VGG), whose hidden
units form the prunable group `fc`.
"""

from typing import Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.errors import ConfigError
from jaxprune.kernels.options import PerformanceOptions
from jaxprune.models import layers

CFGS = {
    'vgg11': (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512),
    'vgg13': (64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512),
    'vgg16': (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M',
              512, 512, 512),
    'vgg19': (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512,
              'M', 512, 512, 512, 512),
}


def conv_names(cfg: Sequence) -> list[str]:
  names, stage, index = [], 1, 0
  for item in cfg:
    if item == 'M':
      stage, index = stage + 1, 0
    else:
      index += 1
      names.append(f'conv{stage}_{index}')
  return names


class VGG(layers.Network):
  cfg: Sequence = CFGS['vgg16']
  classifier: str = 'linear'
  fc_width: int = 512
  num_classes: int = 10
  widths: Mapping[str, int] | None = None
  performance: PerformanceOptions = PerformanceOptions()
  bn_scale_init: float = 1.0
  dense_init: str = 'lecun_normal'

  def default_widths(self) -> dict[str, int]:
    widths = dict(zip(conv_names(self.cfg), [c for c in self.cfg if c != 'M']))
    if self.classifier == 'mlp':
      widths['fc'] = self.fc_width
    return widths

  def prunable_groups(self) -> tuple[str, ...]:
    return tuple(self.default_widths())

  def group_layers(self) -> dict[str, str]:
    return {g: f'{g}_conv' if g != 'fc' else 'fc_dense' for g in self.default_widths()}

  def min_image_size(self) -> int:
    return 2 ** sum(1 for c in self.cfg if c == 'M')

  @nn.compact
  def __call__(self, x, train: bool = False):
    perf = self.performance
    widths = layers.resolve_widths(type(self).__name__, self.default_widths(), self.widths)
    if min(x.shape[1:3]) < self.min_image_size():
      # The images are the user's dataset (and image size): a ConfigError.
      raise ConfigError(f"this VGG needs images of at least {self.min_image_size()}x"
                        f"{self.min_image_size()} pixels, got {x.shape[1]}x{x.shape[2]}.")
    names = iter(conv_names(self.cfg))
    for item in self.cfg:
      if item == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      name = next(names)
      x = layers.conv(perf, widths[name], 3, name=f'{name}_conv')(x)
      x = nn.relu(layers.batch_norm(perf, train, self.bn_scale_init, name=f'{name}_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    if self.classifier == 'mlp':
      x = layers.dense(widths['fc'], self.dense_init, name='fc_dense')(x)
      x = nn.relu(layers.batch_norm(perf, train, self.bn_scale_init, name='fc_bn')(x))
    elif self.classifier != 'linear':
      raise ValueError(f"unknown VGG classifier {self.classifier!r}; choose 'linear' or 'mlp'.")
    return layers.dense(self.num_classes, self.dense_init, name='head')(x)
