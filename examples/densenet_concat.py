"""A small DenseNet (Huang et al. 2017) in Flax Linen: every layer reads the concatenation.

Plain Linen, written without jaxprune and without channel selections: each layer's
BatchNorm and conv read the whole concatenated stream, so pruning a layer's output
removes it at its offset in every later layer's input.
`python launch.py --model=examples.densenet_concat:factory` trains and prunes it in every
regime.
"""

import flax.linen as nn
import jax.numpy as jnp


class DenseNet(nn.Module):
  stem: int = 8
  growth: int = 4
  layers_per_block: int = 3
  blocks: int = 2
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    x = nn.Conv(self.stem, (3, 3), padding='SAME', use_bias=False)(x)
    for block in range(self.blocks):
      for _ in range(self.layers_per_block):
        y = nn.Conv(self.growth, (3, 3), padding='SAME', use_bias=False)(nn.relu(norm()(x)))
        x = jnp.concatenate([x, y], axis=-1)
      if block < self.blocks - 1:
        x = nn.Conv(x.shape[-1] // 2, (1, 1), use_bias=False)(nn.relu(norm()(x)))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(nn.relu(norm()(x)), axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def factory(num_classes: int) -> DenseNet:
  """The model for `launch.py --model=examples.densenet_concat:factory` (called with train=...)."""
  return DenseNet(num_classes=num_classes)
