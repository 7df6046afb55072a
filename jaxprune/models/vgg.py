"""VGG for CIFAR-sized images (`VGG`) and for ImageNet (`ImageNetVGG`), built from a layer
list and a widths mapping.

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
import jax
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


# ImageNetVGG's classifiers (its `classifier` field).
IMAGENET_CLASSIFIERS = {
    'dropout': "torchvision's: Dense -> ReLU -> Dropout(0.5), twice, then Dense",
    'bn': "[R]'s network-slimming VGG-11: Dense -> BN -> ReLU, twice, then Dense (no dropout)",
}


class ImageNetVGG(layers.Network):
  """VGG with BatchNorm for 224x224 images: torchvision's vgg11_bn / vgg16_bn.

  The conv stack of `cfg` (a CIFAR `CFGS` entry, groups `conv{stage}_{index}` as `VGG`'s),
  each conv followed by BN and ReLU, then a fifth 2x2 max pool; the classifier reads the
  flattened final map (7x7x512 at 224x224, as the torchvision of [R]'s code, whose VGG
  flattens its features directly) through two hidden Dense layers of `fc_width` units,
  the prunable groups `fc1` and `fc2`, and the Dense head. Every group is prunable.

  Dropout (`classifier` 'dropout'): as torchvision, Dropout(0.5) after each hidden ReLU
  while training; its key is the state variable `batch_stats/dropout_key` (PRNG key data),
  which every training call splits and advances, so a resumed run draws the masks the
  uninterrupted one draws. Evaluation (and every criterion) runs without dropout.
  `classifier` 'bn' is [R]'s network-slimming VGG-11: a BN (prunable by its scale, as
  slimming prunes it) after each hidden Dense, and no dropout.
  Differences from torchvision: the convolutions have no bias (BN follows each, so a bias
  changes nothing but the parameter count: 4,224 fewer in VGG-16); the flattened map is
  NHWC-ordered (a permutation of fc1's input rows against PyTorch's NCHW); the Dense
  kernels start from `dense_init` (torchvision's: normal_0.01); an image of
  another size than 224x224 feeds its own map size to fc1, where torchvision's adaptive
  pool would first average or repeat it to 7x7.
  """
  cfg: Sequence = CFGS['vgg16']
  classifier: str = 'dropout'
  fc_width: int = 4096
  dropout_rate: float = 0.5
  num_classes: int = 1000
  widths: Mapping[str, int] | None = None
  performance: PerformanceOptions = PerformanceOptions()
  bn_scale_init: float = 1.0
  dense_init: str = 'lecun_normal'

  def default_widths(self) -> dict[str, int]:
    widths = dict(zip(conv_names(self.cfg), [c for c in self.cfg if c != 'M']))
    return {**widths, 'fc1': self.fc_width, 'fc2': self.fc_width}

  def prunable_groups(self) -> tuple[str, ...]:
    return tuple(self.default_widths())

  def group_layers(self) -> dict[str, str]:
    return {g: f'{g}_dense' if g.startswith('fc') else f'{g}_conv' for g in self.default_widths()}

  def min_image_size(self) -> int:
    return 2 ** (1 + sum(1 for c in self.cfg if c == 'M'))

  @nn.compact
  def __call__(self, x, train: bool = False):
    perf = self.performance
    if self.classifier not in IMAGENET_CLASSIFIERS:
      raise ValueError(f'unknown ImageNetVGG classifier {self.classifier!r}; one of '
                       f'{list(IMAGENET_CLASSIFIERS)}.')
    widths = layers.resolve_widths(type(self).__name__, self.default_widths(), self.widths)
    if min(x.shape[1:3]) < self.min_image_size():
      # The images are the user's dataset (and image size): a ConfigError.
      raise ConfigError(f"this VGG needs images of at least {self.min_image_size()}x"
                        f"{self.min_image_size()} pixels, got {x.shape[1]}x{x.shape[2]}.")
    names = iter(conv_names(self.cfg))
    for item in tuple(self.cfg) + ('M',):
      if item == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      name = next(names)
      x = layers.conv(perf, widths[name], 3, name=f'{name}_conv')(x)
      x = nn.relu(layers.batch_norm(perf, train, self.bn_scale_init, name=f'{name}_bn')(x))
    x = x.reshape(x.shape[0], -1)
    keys = self._dropout_keys(train) if self.classifier == 'dropout' else None
    for i, group in enumerate(('fc1', 'fc2')):
      x = layers.dense(widths[group], self.dense_init, name=f'{group}_dense')(x)
      if self.classifier == 'bn':
        x = layers.batch_norm(perf, train, self.bn_scale_init, name=f'{group}_bn')(x)
      x = nn.relu(x)
      if keys is not None:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x, rng=keys[i])
    return layers.dense(self.num_classes, self.dense_init, name='head')(x)

  def _dropout_keys(self, train: bool):
    """The two dropout layers' keys while training (None in evaluation); advances the
    state's key."""
    state = self.variable('batch_stats', 'dropout_key',
                          lambda: jax.random.key_data(self.make_rng('params')))
    if not train:
      return None
    first, second, advanced = jax.random.split(jax.random.wrap_key_data(state.value), 3)
    state.value = jax.random.key_data(advanced)
    return first, second
