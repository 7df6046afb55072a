"""VGG for CIFAR-sized images (`VGG`) and for ImageNet (`ImageNetVGG`).

Conv groups are named `conv{stage}_{index}` (stage counted between max-pools, both from
1: VGG-16's are conv1_1 ... conv5_3 as in the pruning literature). Every conv is followed
by BN and ReLU and is prunable. `VGG` global-average pools the feature map (the reference
2x2 average pool at 32x32); its classifier is 'linear', one Dense layer (network
slimming's VGG), or 'mlp', Dense(fc) -> BN -> ReLU -> Dense (L1-norm filter pruning's VGG)
whose hidden units are the prunable group `fc`.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune.models import layers

CFGS = {
    'vgg11': (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512),
    'vgg13': (64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512),
    'vgg16': (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M',
              512, 512, 512),
    'vgg19': (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512,
              'M', 512, 512, 512, 512),
}


def conv_widths(cfg: Sequence) -> dict[str, int]:
  """{conv group: channels} of a layer list, in order."""
  widths, stage, index = {}, 1, 0
  for item in cfg:
    if item == 'M':
      stage, index = stage + 1, 0
    else:
      index += 1
      widths[f'conv{stage}_{index}'] = item
  return widths


class VGG(layers.Network):
  cfg: Sequence = CFGS['vgg16']
  classifier: str = 'linear'
  fc_width: int = 512

  def default_widths(self) -> dict[str, int]:
    widths = conv_widths(self.cfg)
    if self.classifier == 'mlp':
      widths['fc'] = self.fc_width
    return widths

  def group_layers(self) -> dict[str, str]:
    return {g: f'{g}_dense' if g.startswith('fc') else f'{g}_conv' for g in self.default_widths()}

  @nn.nowrap
  def features(self, x, train: bool, widths: dict[str, int], stack: Sequence):
    """The conv stack `stack`: `cfg`'s channels (named by `conv_widths`) and max pools ('M')."""
    layers.check_image(x, 2 ** stack.count('M'), 'this VGG needs images of')
    names = iter(conv_widths(self.cfg))
    for item in stack:
      if item == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        name = next(names)
        x = self.conv(widths[name], 3, name=f'{name}_conv')(x)
        x = nn.relu(self.batch_norm(train, f'{name}_bn')(x))
    return x

  @nn.compact
  def __call__(self, x, train: bool = False):
    widths = self.resolved_widths()
    x = jnp.mean(self.features(x, train, widths, self.cfg), axis=(1, 2))
    if self.classifier == 'mlp':
      x = layers.dense(widths['fc'], self.dense_init, name='fc_dense')(x)
      x = nn.relu(self.batch_norm(train, 'fc_bn')(x))
    elif self.classifier != 'linear':
      raise ValueError(f"unknown VGG classifier {self.classifier!r}; choose 'linear' or 'mlp'.")
    return layers.dense(self.num_classes, self.dense_init, name='head')(x)


class ImageNetVGG(VGG):
  """VGG with BatchNorm for 224x224 images: torchvision's vgg11_bn / vgg16_bn.

  `VGG`'s conv stack, then a fifth 2x2 max pool; the flattened final map (7x7x512 at
  224x224, as in [R]'s torchvision) goes through two hidden Dense layers of `fc_width`
  units, the prunable groups `fc1` and `fc2`, and the Dense head. `classifier` 'dropout'
  (torchvision's): Dropout(0.5) after each hidden ReLU while training, keyed by the state
  variable `batch_stats/dropout_key`, which every training call advances, so a resumed run
  draws the masks the uninterrupted one draws; 'bn' ([R]'s network-slimming VGG-11): a BN
  after each hidden Dense, no dropout. Unlike torchvision: the convolutions have no bias
  (BN follows each); the flattened map is NHWC-ordered; the Dense kernels start from
  `dense_init`; another image size than 224x224 feeds its own map size to fc1 (no adaptive
  pool to 7x7).
  """
  num_classes: int = 1000
  classifier: str = 'dropout'
  fc_width: int = 4096
  dropout_rate: float = 0.5

  def default_widths(self) -> dict[str, int]:
    return {**conv_widths(self.cfg), 'fc1': self.fc_width, 'fc2': self.fc_width}

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.classifier not in ('dropout', 'bn'):
      raise ValueError(f"unknown ImageNetVGG classifier {self.classifier!r}; one of "
                       "['dropout', 'bn'].")
    widths = self.resolved_widths()
    x = self.features(x, train, widths, (*self.cfg, 'M'))
    x = x.reshape(x.shape[0], -1)
    keys = self._dropout_keys(train) if self.classifier == 'dropout' else None
    for i, group in enumerate(('fc1', 'fc2')):
      x = layers.dense(widths[group], self.dense_init, name=f'{group}_dense')(x)
      if self.classifier == 'bn':
        x = self.batch_norm(train, f'{group}_bn')(x)
      x = nn.relu(x)
      if keys is not None:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x, rng=keys[i])
    return layers.dense(self.num_classes, self.dense_init, name='head')(x)

  def _dropout_keys(self, train: bool):
    """The two dropout layers' keys while training (None in evaluation), advancing the state's."""
    state = self.variable('batch_stats', 'dropout_key',
                          lambda: jax.random.key_data(self.make_rng('params')))
    if not train:
      return None
    first, second, advanced = jax.random.split(jax.random.wrap_key_data(state.value), 3)
    state.value = jax.random.key_data(advanced)
    return first, second
