"""ResNets. CIFAR: basic-block ResNet (6n+2), pre-activation bottleneck ResNet (9n+2),
WideResNet. ImageNet: torchvision's ResNet-18/34/50/101 (`ImageNetResNet`).

Stream widths (the residual sum of a stage) are groups named `stage{s}`; they can be
changed to build thinner networks but are not prunable, because every block of the
stage adds into them. The prunable groups are the channels internal to a block.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune.models import layers


def _check_image(x, downsamplings: int):
  layers.check_image(x, 2 ** downsamplings,
                     f'this network halves the image {downsamplings} times and needs')


def _blocks(per_stage: Sequence[int]) -> list[tuple[int, int, str]]:
  """(stage, block, name) of every block, in order, both counted from 1."""
  return [(s, b, f'stage{s}_block{b}') for s, n in enumerate(per_stage, 1)
          for b in range(1, n + 1)]


def _cifar_blocks(name: str, depth: int, per_block: int, extra: int) -> list[tuple[int, int, str]]:
  """`_blocks` of a three-stage network of depth per_block * n + extra."""
  n, rest = divmod(depth - extra, per_block)
  if rest or n < 1:
    raise ValueError(f"{name} depth must be {per_block}n+{extra} with n >= 1, got {depth}.")
  return _blocks((n,) * 3)


def _basic_branch(conv, bn, x, width: int, out: int, stride: int, block: str):
  """A basic block's residual branch: 3x3 conv, BN, ReLU, 3x3 conv, BN."""
  y = conv(width, 3, stride, name=f'{block}_conv1')(x)
  y = nn.relu(bn(f'{block}_bn1')(y))
  return bn(f'{block}_bn2')(conv(out, 3, name=f'{block}_conv2')(y))


# The parameter-free shortcuts of a basic-block ResNet's downsampling blocks.
SHORTCUTS = {
    'subsample': 'strided subsample + zero-pad channels; gradients flow through it',
    'avgpool_detached': "[R]'s code: 2x2 average pool + zero-pad, built from detached data "
                        '(no gradient flows through it)',
}


class ResNet(layers.Network):
  """Basic-block CIFAR ResNet with the parameter-free shortcut (`shortcut`, a key of
  SHORTCUTS, in the blocks that downsample; identity elsewhere).

  Prunable: `stage{s}_block{b}`, the output of each block's first conv (s, b from 1).
  """
  depth: int = 56
  stage_widths: Sequence[int] = (16, 32, 64)
  shortcut: str = 'subsample'

  def blocks(self) -> list[tuple[int, int, str]]:
    return _cifar_blocks('ResNet', self.depth, 6, 2)

  def prunable_groups(self) -> tuple[str, ...]:
    return tuple(block for _, _, block in self.blocks())

  def group_layers(self) -> dict[str, str]:
    streams = {'stage1': 'stem', 'stage2': 'stage2_block1_conv2', 'stage3': 'stage3_block1_conv2'}
    return {**streams, **{g: f'{g}_conv1' for g in self.prunable_groups()}}

  def default_widths(self) -> dict[str, int]:
    widths = {f'stage{s}': w for s, w in zip((1, 2, 3), self.stage_widths)}
    widths.update({g: self.stage_widths[int(g[5]) - 1] for g in self.prunable_groups()})
    return widths

  @nn.compact
  def __call__(self, x, train: bool = False):
    widths = self.resolved_widths()
    _check_image(x, 2)
    conv = functools.partial(layers.conv, self.performance)
    bn = lambda name: self.batch_norm(train, name)
    x = nn.relu(bn('stem_bn')(conv(widths['stage1'], 3, name='stem')(x)))
    for s, b, block in self.blocks():
      out = widths[f'stage{s}']
      if b == 1 and out < x.shape[-1]:
        raise ValueError(f"stage{s} width {out} is narrower than the stage before it "
                         f"({x.shape[-1]}); the zero-padding shortcut needs it at least as wide.")
      stride = 2 if s > 1 and b == 1 else 1
      y = _basic_branch(conv, bn, x, widths[block], out, stride, block)
      x = nn.relu(y + self.downsampled(x, stride, out))
    return self.classify(x)

  def downsampled(self, x, stride: int, out: int):
    """The block's shortcut: `x` itself, or `shortcut`'s parameter-free downsampling."""
    if stride == 1 and out == x.shape[-1]:
      return x
    if self.shortcut == 'subsample':
      y = x[:, ::stride, ::stride, :]
    elif self.shortcut == 'avgpool_detached':
      y = jax.lax.stop_gradient(nn.avg_pool(x, (stride, stride), strides=(stride, stride),
                                            padding='SAME', count_include_pad=False))
    else:
      raise ValueError(f'unknown ResNet shortcut {self.shortcut!r}; one of {list(SHORTCUTS)}.')
    return jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, out - x.shape[-1])))


class PreResNet(layers.Network):
  """Pre-activation bottleneck ResNet (depth 9n+2), pruned as network slimming does.

  Each block reads its input through a channel selection (`stage{s}_block{b}_in`:
  BN + ReLU on the selected stream channels), then 1x1 conv (`_mid1`), 3x3 conv
  (`_mid2`) and a 1x1 conv back to the stream width. All three block groups are
  prunable, as is `final`, the selection before the classifier. The stream is not.
  """
  depth: int = 164
  planes: Sequence[int] = (16, 32, 64)
  expansion: int = 4

  def blocks(self) -> list[tuple[int, int, str]]:
    return _cifar_blocks('PreResNet', self.depth, 9, 2)

  def prunable_groups(self) -> tuple[str, ...]:
    groups = [f'{block}_{part}' for _, _, block in self.blocks() for part in ('in', 'mid1', 'mid2')]
    return tuple(groups) + ('final',)

  def group_layers(self) -> dict[str, str]:
    layers_of = {'stem': 'stem', **{f'stage{s}': f'stage{s}_block1_conv3' for s in (1, 2, 3)}}
    for group in self.prunable_groups():
      block, _, part = group.rpartition('_')
      layers_of[group] = {'mid1': f'{block}_conv1',
                          'mid2': f'{block}_conv2'}.get(part, f'{group}_select')
    return layers_of

  def default_widths(self) -> dict[str, int]:
    stream = [p * self.expansion for p in self.planes]
    widths = {'stem': self.planes[0]}
    widths.update({f'stage{s}': w for s, w in zip((1, 2, 3), stream)})
    for s, b, block in self.blocks():
      reads = self.planes[0] if (s, b) == (1, 1) else stream[s - 1 if b > 1 else s - 2]
      widths[f'{block}_in'] = reads
      widths[f'{block}_mid1'] = self.planes[s - 1]
      widths[f'{block}_mid2'] = self.planes[s - 1]
    widths['final'] = stream[-1]
    return widths

  @nn.compact
  def __call__(self, x, train: bool = False):
    perf = self.performance
    widths = self.resolved_widths()
    _check_image(x, 2)
    x = layers.conv(perf, widths['stem'], 3, name='stem')(x)
    for s, b, block in self.blocks():
      stride = 2 if s > 1 and b == 1 else 1
      y = layers.SelectBnRelu(widths[f'{block}_in'], train, perf, self.bn_scale_init,
                              name=f'{block}_in_select')(x)
      y = layers.conv(perf, widths[f'{block}_mid1'], 1, name=f'{block}_conv1')(y)
      y = nn.relu(self.batch_norm(train, f'{block}_bn2')(y))
      y = layers.conv(perf, widths[f'{block}_mid2'], 3, stride, name=f'{block}_conv2')(y)
      y = nn.relu(self.batch_norm(train, f'{block}_bn3')(y))
      y = layers.conv(perf, widths[f'stage{s}'], 1, name=f'{block}_conv3')(y)
      if b == 1:
        x = layers.conv(perf, widths[f'stage{s}'], 1, stride, name=f'{block}_shortcut')(x)
      x = x + y
    x = layers.SelectBnRelu(widths['final'], train, perf, self.bn_scale_init,
                            name='final_select')(x)
    return self.classify(x)


class WideResNet(layers.Network):
  """Pre-activation WideResNet WRN-depth-k (depth 6n+4).

  Prunable: `stage{s}_block{b}`, the output of each block's first conv, as in
  Fisher pruning. The first block of a stage whose width changes uses a 1x1
  projection shortcut on the pre-activated input.
  """
  depth: int = 40
  widen_factor: int = 2

  def blocks(self) -> list[tuple[int, int, str]]:
    return _cifar_blocks('WideResNet', self.depth, 6, 4)

  def prunable_groups(self) -> tuple[str, ...]:
    return tuple(block for _, _, block in self.blocks())

  def group_layers(self) -> dict[str, str]:
    layers_of = {'stem': 'stem', **{f'stage{s}': f'stage{s}_block1_conv2' for s in (1, 2, 3)}}
    layers_of.update({g: f'{g}_conv1' for g in self.prunable_groups()})
    return {g: layers_of[g] for g in self.default_widths()}

  def default_widths(self) -> dict[str, int]:
    stage = [16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]
    # With widen factor 1 the stem feeds stage 1 through identity shortcuts: one stream.
    widths = {'stem': 16} if self.widen_factor != 1 else {}
    widths.update({f'stage{s}': w for s, w in zip((1, 2, 3), stage)})
    widths.update({g: stage[int(g[5]) - 1] for g in self.prunable_groups()})
    return widths

  @nn.compact
  def __call__(self, x, train: bool = False):
    perf = self.performance
    widths = self.resolved_widths()
    _check_image(x, 2)
    x = layers.conv(perf, widths.get('stem', widths['stage1']), 3, name='stem')(x)
    for s, b, block in self.blocks():
      stride = 2 if s > 1 and b == 1 else 1
      pre = nn.relu(self.batch_norm(train, f'{block}_bn1')(x))
      # Projection iff the default network changes width or resolution here; a
      # structural choice that must not depend on the (prunable) widths.
      if b == 1 and (s > 1 or self.widen_factor != 1):
        shortcut = layers.conv(perf, widths[f'stage{s}'], 1, stride, name=f'{block}_shortcut')(pre)
      else:
        shortcut = x
      y = layers.conv(perf, widths[block], 3, stride, name=f'{block}_conv1')(pre)
      y = nn.relu(self.batch_norm(train, f'{block}_bn2')(y))
      y = layers.conv(perf, widths[f'stage{s}'], 3, name=f'{block}_conv2')(y)
      if shortcut.shape[-1] != y.shape[-1]:
        raise ValueError(f"stage{s} width {y.shape[-1]} must equal the width entering it "
                         f"({shortcut.shape[-1]}) for a WideResNet with identity shortcuts.")
      x = y + shortcut
    return self.classify(nn.relu(self.batch_norm(train, 'final_bn')(x)))


# torchvision's ImageNet ResNets by depth: the block and the blocks of each of the 4 stages.
IMAGENET_DEPTHS = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)),
                   50: ('bottleneck', (3, 4, 6, 3)), 101: ('bottleneck', (3, 4, 23, 3))}


class ImageNetResNet(layers.Network):
  """torchvision's ImageNet ResNet (the one [R]'s and [M]'s ImageNet code build).

  Stem: 7x7/2 conv + BN + ReLU + 3x3/2 max pool. Four stages of `stage_widths` with basic
  blocks (depth 18, 34) or bottleneck blocks (50, 101: 1x1, 3x3, 1x1 convs, the stream 4x
  the inner width, the stride on the 3x3 as torchvision's "ResNet v1.5"); the first block
  of stages 2-4 (and of stage 1 in a bottleneck network) adds a 1x1 conv + BN projection;
  global average pool, Dense head. Convolutions are padded as PyTorch pads them.

  Groups: `stage{s}`, each stage's residual stream (not prunable). Basic blocks:
  `stage{s}_block{b}`, the first conv's output, prunable (as [R]'s L1-norm ResNet-34).
  Bottleneck blocks: `stage{s}_block{b}_mid1` and `_mid2`, the 1x1 and 3x3 convs' outputs,
  prunable, and `stem`, the stem's channels (not prunable, as in the papers).
  Unlike torchvision, the head's kernel starts from `dense_init`.
  """
  num_classes: int = 1000
  depth: int = 50
  stage_widths: Sequence[int] = (64, 128, 256, 512)

  def architecture(self) -> tuple[str, tuple[int, ...]]:
    if self.depth not in IMAGENET_DEPTHS:
      raise ValueError(f'ImageNetResNet depth must be one of {sorted(IMAGENET_DEPTHS)}, '
                       f'got {self.depth}.')
    return IMAGENET_DEPTHS[self.depth]

  def _bottleneck(self) -> bool:
    return self.architecture()[0] == 'bottleneck'

  def prunable_groups(self) -> tuple[str, ...]:
    parts = ('_mid1', '_mid2') if self._bottleneck() else ('',)
    return tuple(f'{block}{part}' for _, _, block in _blocks(self.architecture()[1])
                 for part in parts)

  def group_layers(self) -> dict[str, str]:
    last = 'conv3' if self._bottleneck() else 'conv2'
    layers_of = {'stem': 'stem'} if self._bottleneck() else {}
    layers_of.update({f'stage{s}': f'stage{s}_block1_{last}' for s in (1, 2, 3, 4)})
    for group in self.prunable_groups():
      block, _, part = group.rpartition('_')
      layers_of[group] = {'mid1': f'{block}_conv1',
                          'mid2': f'{block}_conv2'}.get(part, f'{group}_conv1')
    return layers_of

  def default_widths(self) -> dict[str, int]:
    expansion = 4 if self._bottleneck() else 1  # a bottleneck's stream is 4x its inner width
    widths = {'stem': self.stage_widths[0]} if self._bottleneck() else {}
    widths.update({f'stage{s}': w * expansion for s, w in enumerate(self.stage_widths, 1)})
    widths.update({g: self.stage_widths[int(g[5]) - 1] for g in self.prunable_groups()})
    return widths

  @nn.compact
  def __call__(self, x, train: bool = False):
    widths = self.resolved_widths()
    _check_image(x, 5)
    bottleneck = self._bottleneck()
    conv = functools.partial(layers.conv, self.performance, torch_padding=True)
    bn = lambda name: self.batch_norm(train, name)
    x = conv(widths['stem' if bottleneck else 'stage1'], 7, 2, name='stem')(x)
    x = nn.relu(bn('stem_bn')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s, b, block in _blocks(self.architecture()[1]):
      stride = 2 if s > 1 and b == 1 else 1
      out = widths[f'stage{s}']
      if bottleneck:
        y = conv(widths[f'{block}_mid1'], 1, name=f'{block}_conv1')(x)
        y = nn.relu(bn(f'{block}_bn1')(y))
        y = conv(widths[f'{block}_mid2'], 3, stride, name=f'{block}_conv2')(y)
        y = nn.relu(bn(f'{block}_bn2')(y))
        y = bn(f'{block}_bn3')(conv(out, 1, name=f'{block}_conv3')(y))
      else:
        y = _basic_branch(conv, bn, x, widths[block], out, stride, block)
      # Projection iff the default network changes width or resolution here (torchvision's
      # rule); a structural choice that must not depend on the (prunable) widths.
      if b == 1 and (s > 1 or bottleneck):
        shortcut = bn(f'{block}_shortcut_bn')(conv(out, 1, stride, name=f'{block}_shortcut')(x))
      else:
        shortcut = x
      x = nn.relu(y + shortcut)
    return self.classify(x)
