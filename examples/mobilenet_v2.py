"""A small MobileNetV2 in Flax NNX (Sandler et al. 2018): inverted residuals, depthwise convs.

Plain NNX, written without jaxprune. `python launch.py --model=examples.mobilenet_v2:factory`
trains, prunes and retrains it in every regime; `jaxprune.Pruner(MobileNetV2(...), None,
images)` prunes it in your own code (README, "Your own model").
"""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# (expansion t, output channels c, blocks n, first stride s), CIFAR-sized and tiny.
SMALL = ((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2))


class ConvBN(nnx.Module):
  """Conv (no bias) -> BatchNorm -> optional ReLU6."""

  def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
               relu: bool = True, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(c_in, c_out, (kernel, kernel), strides=stride, padding='SAME',
                         feature_group_count=groups, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(c_out, momentum=0.9, rngs=rngs)
    self.relu = relu

  def __call__(self, x):
    x = self.bn(self.conv(x))
    return jax.nn.relu6(x) if self.relu else x


class InvertedResidual(nnx.Module):
  """1x1 expand -> 3x3 depthwise -> 1x1 project, with a residual when shapes allow."""

  def __init__(self, c_in: int, c_out: int, stride: int, expansion: int, *, rngs: nnx.Rngs):
    hidden = c_in * expansion
    self.expand = ConvBN(c_in, hidden, 1, rngs=rngs) if expansion != 1 else None
    self.depthwise = ConvBN(hidden, hidden, 3, stride, groups=hidden, rngs=rngs)
    self.project = ConvBN(hidden, c_out, 1, relu=False, rngs=rngs)
    self.residual = stride == 1 and c_in == c_out

  def __call__(self, x):
    y = self.expand(x) if self.expand is not None else x
    y = self.project(self.depthwise(y))
    return x + y if self.residual else y


class MobileNetV2(nnx.Module):

  def __init__(self, num_classes: int = 10, stem: int = 8, last: int = 32,
               blocks: Sequence[tuple[int, int, int, int]] = SMALL, channels: int = 3, *,
               rngs: nnx.Rngs):
    self.stem = ConvBN(channels, stem, 3, rngs=rngs)
    layers, c = [], stem
    for t, c_out, n, s in blocks:
      for i in range(n):
        layers.append(InvertedResidual(c, c_out, s if i == 0 else 1, t, rngs=rngs))
        c = c_out
    self.blocks = nnx.List(layers)
    self.last = ConvBN(c, last, 1, rngs=rngs)
    self.head = nnx.Linear(last, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    x = jnp.mean(self.last(x), axis=(1, 2))
    return self.head(x)


def factory(num_classes: int, image_shape: tuple[int, int, int], rngs: nnx.Rngs) -> MobileNetV2:
  """The model for `launch.py --model=examples.mobilenet_v2:factory`."""
  return MobileNetV2(num_classes, channels=image_shape[-1], rngs=rngs)
