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
  """Basic-block CIFAR ResNet; a downsampling block's shortcut is `shortcut` (parameter-free,
  a key of SHORTCUTS), the others' identity. Prunable: `stage{s}_block{b}`, each block's
  first conv output."""
  depth: int = 56
  stage_widths: Sequence[int] = (16, 32, 64)
  shortcut: str = 'subsample'

  def blocks(self) -> list[tuple[int, int, str]]:
    return _blocks((layers.blocks_per_stage(self, 6, 2),) * 3)

  def prunable_groups(self) -> tuple[str, ...]:
    return tuple(block for _, _, block in self.blocks())

  def group_layers(self) -> dict[str, str]:
    streams = {'stage1': 'stem', 'stage2': 'stage2_block1_conv2', 'stage3': 'stage3_block1_conv2'}
    return {**streams, **{g: f'{g}_conv1' for g in self.prunable_groups()}}

  def default_widths(self) -> dict[str, int]:
    widths = {f'stage{s}': w for s, w in zip((1, 2, 3), self.stage_widths)}
    return {**widths, **{block: self.stage_widths[s - 1] for s, _, block in self.blocks()}}

  @nn.compact
  def __call__(self, x, train: bool = False):
    widths = self.resolved_widths()
    _check_image(x, 2)
    bn = lambda name: self.batch_norm(train, name)
    x = nn.relu(bn('stem_bn')(self.conv(widths['stage1'], 3, name='stem')(x)))
    for s, b, block in self.blocks():
      out = widths[f'stage{s}']
      if b == 1 and out < x.shape[-1]:
        raise ValueError(f"stage{s} width {out} is narrower than the stage before it "
                         f"({x.shape[-1]}); the zero-padding shortcut needs it at least as wide.")
      stride = 2 if s > 1 and b == 1 else 1
      y = _basic_branch(self.conv, bn, x, widths[block], out, stride, block)
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

  Each block reads its input through a channel selection (`stage{s}_block{b}_in`: BN + ReLU
  on the selected stream channels), then 1x1 conv (`_mid1`), 3x3 conv (`_mid2`) and a 1x1
  conv back to the stream width. The three block groups and `final`, the selection before
  the classifier, are prunable; the stream is not.
  """
  depth: int = 164
  planes: Sequence[int] = (16, 32, 64)
  expansion: int = 4

  def blocks(self) -> list[tuple[int, int, str]]:
    return _blocks((layers.blocks_per_stage(self, 9, 2),) * 3)

  def prunable_groups(self) -> tuple[str, ...]:
    groups = [f'{block}_{part}' for _, _, block in self.blocks() for part in ('in', 'mid1', 'mid2')]
    return tuple(groups) + ('final',)

  def group_layers(self) -> dict[str, str]:
    layers_of = {'stem': 'stem', **{f'stage{s}': f'stage{s}_block1_conv3' for s in (1, 2, 3)}}
    for _, _, block in self.blocks():
      layers_of.update({f'{block}_in': f'{block}_in_select', f'{block}_mid1': f'{block}_conv1',
                        f'{block}_mid2': f'{block}_conv2'})
    return {**layers_of, 'final': 'final_select'}

  def default_widths(self) -> dict[str, int]:
    stream = [p * self.expansion for p in self.planes]
    widths = {'stem': self.planes[0]}
    widths.update({f'stage{s}': w for s, w in zip((1, 2, 3), stream)})
    for s, b, block in self.blocks():
      reads = self.planes[0] if (s, b) == (1, 1) else stream[s - 1 if b > 1 else s - 2]
      widths.update({f'{block}_in': reads, f'{block}_mid1': self.planes[s - 1],
                     f'{block}_mid2': self.planes[s - 1]})
    return {**widths, 'final': stream[-1]}

  @nn.compact
  def __call__(self, x, train: bool = False):
    widths = self.resolved_widths()
    _check_image(x, 2)
    x = self.conv(widths['stem'], 3, name='stem')(x)
    for s, b, block in self.blocks():
      stride = 2 if s > 1 and b == 1 else 1
      y = self.select(f'{block}_in', widths[f'{block}_in'], train)(x)
      y = self.conv(widths[f'{block}_mid1'], 1, name=f'{block}_conv1')(y)
      y = nn.relu(self.batch_norm(train, f'{block}_bn2')(y))
      y = self.conv(widths[f'{block}_mid2'], 3, stride, name=f'{block}_conv2')(y)
      y = nn.relu(self.batch_norm(train, f'{block}_bn3')(y))
      y = self.conv(widths[f'stage{s}'], 1, name=f'{block}_conv3')(y)
      if b == 1:
        x = self.conv(widths[f'stage{s}'], 1, stride, name=f'{block}_shortcut')(x)
      x = x + y
    return self.classify(self.select('final', widths['final'], train)(x))


class WideResNet(layers.Network):
  """Pre-activation WideResNet WRN-depth-k (depth 6n+4). Prunable: `stage{s}_block{b}`, each
  block's first conv output, as in Fisher pruning. The first block of a stage whose width
  changes has a 1x1 projection shortcut on the pre-activated input."""
  depth: int = 40
  widen_factor: int = 2

  def blocks(self) -> list[tuple[int, int, str]]:
    return _blocks((layers.blocks_per_stage(self, 6, 4),) * 3)

  def prunable_groups(self) -> tuple[str, ...]:
    return tuple(block for _, _, block in self.blocks())

  def group_layers(self) -> dict[str, str]:
    layers_of = {'stem': 'stem', **{f'stage{s}': f'stage{s}_block1_conv2' for s in (1, 2, 3)}}
    layers_of.update({g: f'{g}_conv1' for g in self.prunable_groups()})
    return {g: layers_of[g] for g in self.default_widths()}

  def default_widths(self) -> dict[str, int]:
    stage = [w * self.widen_factor for w in (16, 32, 64)]
    # With widen factor 1 the stem feeds stage 1 through identity shortcuts: one stream.
    widths = {'stem': 16} if self.widen_factor != 1 else {}
    widths.update({f'stage{s}': w for s, w in enumerate(stage, 1)})
    return {**widths, **{block: stage[s - 1] for s, _, block in self.blocks()}}

  @nn.compact
  def __call__(self, x, train: bool = False):
    widths = self.resolved_widths()
    _check_image(x, 2)
    x = self.conv(widths.get('stem', widths['stage1']), 3, name='stem')(x)
    for s, b, block in self.blocks():
      stride = 2 if s > 1 and b == 1 else 1
      pre = nn.relu(self.batch_norm(train, f'{block}_bn1')(x))
      # Projection iff the default network changes width or resolution here, whatever the widths.
      if b == 1 and (s > 1 or self.widen_factor != 1):
        shortcut = self.conv(widths[f'stage{s}'], 1, stride, name=f'{block}_shortcut')(pre)
      else:
        shortcut = x
      y = self.conv(widths[block], 3, stride, name=f'{block}_conv1')(pre)
      y = nn.relu(self.batch_norm(train, f'{block}_bn2')(y))
      y = self.conv(widths[f'stage{s}'], 3, name=f'{block}_conv2')(y)
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

  Prunable: a basic block's first conv output `stage{s}_block{b}` (as [R]'s L1-norm
  ResNet-34); a bottleneck block's 1x1 and 3x3 conv outputs, `stage{s}_block{b}_mid1` and
  `_mid2`. A bottleneck network's stem channels are the group `stem`, not prunable (as in
  the papers). Unlike torchvision, the head's kernel starts from `dense_init`.
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
    return {**widths, **{g: self.stage_widths[int(g[5]) - 1] for g in self.prunable_groups()}}

  @nn.compact
  def __call__(self, x, train: bool = False):
    widths = self.resolved_widths()
    _check_image(x, 5)
    bottleneck = self._bottleneck()
    conv = functools.partial(self.conv, torch_padding=True)
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
      # rule), whatever the (prunable) widths.
      if b == 1 and (s > 1 or bottleneck):
        shortcut = bn(f'{block}_shortcut_bn')(conv(out, 1, stride, name=f'{block}_shortcut')(x))
      else:
        shortcut = x
      x = nn.relu(y + shortcut)
    return self.classify(x)
