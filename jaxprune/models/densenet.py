"""DenseNet for CIFAR (depth 3n+4, no bottleneck), pruned as network slimming does.

Every BN reads the concatenated feature stream through a channel selection, and those
selections are the prunable groups: `block{d}_layer{l}` before each 3x3 conv,
`transition{d}` before each 1x1 transition conv and `final` before the classifier. The
stream itself is never changed; its widths are fields (`stem_width`, `growth`), so a
thinner member of the family is `clone(growth=..., stem_width=...)`. `compression` is [R]'s
compressionRate: each transition conv outputs the stream's channels floor-divided by it
(`densenet100_c`: depth 100 with 2, [R]'s DenseNet-BC-100 without bottleneck layers).
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.models import layers


class DenseNet(layers.Network):
  depth: int = 40
  growth: int = 12
  stem_width: int | None = None  # None: 2 * growth
  compression: int = 1

  def layers_per_block(self) -> int:
    return layers.blocks_per_stage(self, 3, 4)

  def group_layers(self) -> dict[str, str]:
    return {g: f'{g}_select' for g in self.default_widths()}

  def scaled(self, multiplier: float) -> 'DenseNet':
    # The stream's widths are the growth rate and the stem's, not selections: scaling the
    # selections alone would leave channels of the stream that no layer reads.
    growth, stem = (max(1, int(round(w * multiplier))) for w in (self.growth, self.stem_channels()))
    return self.clone(growth=growth, stem_width=stem)

  def stem_channels(self) -> int:
    return 2 * self.growth if self.stem_width is None else self.stem_width

  def default_widths(self) -> dict[str, int]:
    widths, channels = {}, self.stem_channels()
    for d in (1, 2, 3):
      for l in range(1, self.layers_per_block() + 1):
        widths[f'block{d}_layer{l}'] = channels
        channels += self.growth
      widths[f'transition{d}' if d < 3 else 'final'] = channels
      channels //= self.compression
    return widths

  @nn.compact
  def __call__(self, x, train: bool = False):
    widths = self.resolved_widths()
    layers.check_image(x, 4, 'DenseNet halves the image twice and needs')
    x = self.conv(self.stem_channels(), 3, name='stem')(x)
    for d in (1, 2, 3):
      for l in range(1, self.layers_per_block() + 1):
        group = f'block{d}_layer{l}'
        y = self.select(group, widths[group], train)(x)
        x = jnp.concatenate([x, self.conv(self.growth, 3, name=f'{group}_conv')(y)], axis=-1)
      if d < 3:
        channels = x.shape[-1] // self.compression
        y = self.select(f'transition{d}', widths[f'transition{d}'], train)(x)
        x = self.conv(channels, 1, name=f'transition{d}_conv')(y)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    return self.classify(self.select('final', widths['final'], train)(x))
