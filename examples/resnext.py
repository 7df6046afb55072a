"""A stack of ResNeXt blocks in Flax Linen (Xie et al. 2017): grouped 3x3 convolutions.

Plain Linen, written without jaxprune; its widths are constructor fields.
`python launch.py --model=examples.resnext:factory` trains and prunes it in every regime;
`jaxprune.Pruner(functools.partial(model.apply, train=False), variables, images)` prunes it
in your own code.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class Bottleneck(nn.Module):
  """1x1 reduce -> grouped 3x3 -> 1x1 expand, plus a (projected when needed) shortcut."""
  width: int
  out: int
  cardinality: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.relu(norm()(nn.Conv(self.width, (1, 1), use_bias=False)(x)))
    y = nn.Conv(self.width, (3, 3), strides=self.stride, padding='SAME',
                feature_group_count=self.cardinality, use_bias=False)(y)
    y = nn.relu(norm()(y))
    y = norm()(nn.Conv(self.out, (1, 1), use_bias=False)(y))
    if self.stride != 1 or x.shape[-1] != self.out:
      x = norm()(nn.Conv(self.out, (1, 1), strides=self.stride, use_bias=False)(x))
    return nn.relu(x + y)


class ResNeXt(nn.Module):
  stem: int = 16
  stages: Sequence[tuple[int, int, int]] = ((16, 32, 1), (32, 64, 2))  # (width, out, stride)
  cardinality: int = 4
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.stem, (3, 3), padding='SAME', use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for width, out, stride in self.stages:
      x = Bottleneck(width, out, self.cardinality, stride)(x, train)
      x = Bottleneck(width, out, self.cardinality)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def factory(num_classes: int) -> ResNeXt:
  """The model for `launch.py --model=examples.resnext:factory` (called with train=...)."""
  return ResNeXt(num_classes=num_classes)
