"""Building blocks shared by the models: the `Network` base, layers and channel selection.

Every model's channel counts come from a `widths` mapping (group name -> channels);
`group_layers()` names, for every width group, a layer whose outputs are that group's
channels, which names the groups read off the model's program (`jaxprune.prune.program`).
The models know nothing of masks: masking and shrinking happen on the traced program.
"""

from typing import Mapping

import flax.linen as nn
import jax.numpy as jnp
from flax.core import FrozenDict

from jaxprune.errors import ConfigError
from jaxprune.kernels import norm
from jaxprune.kernels.conv import Conv
from jaxprune.kernels.options import PerformanceOptions

# The collection of the stream channels a channel-selection layer reads (not learned).
INDICES = 'indices'

conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class Network(nn.Module):
  """The base of jaxprune's models: the fields they all have, and their layers' makers.

  Construction freezes `widths`, so that models of the same class, widths and options are
  equal and hash alike (a dict would make the module unhashable)."""
  num_classes: int = 10
  widths: Mapping[str, int] | None = None
  performance: PerformanceOptions = PerformanceOptions()
  bn_scale_init: float = 1.0
  dense_init: str = 'lecun_normal'

  def prunable_groups(self) -> tuple[str, ...]:
    """The width groups a criterion may prune: all of them unless a model says otherwise."""
    return tuple(self.default_widths())

  def scaled(self, multiplier: float) -> 'Network':
    """A narrower (or wider) member of the family: every default width times `multiplier`,
    rounded, at least 1. Models whose widths follow fields of their own override it."""
    return self.clone(widths={g: max(1, int(round(w * multiplier)))
                              for g, w in self.default_widths().items()})

  def __post_init__(self):
    if self.widths is not None and not isinstance(self.widths, FrozenDict):
      # Before Module.__post_init__ the fields are still settable, as in a dataclass.
      object.__setattr__(self, 'widths', FrozenDict(self.widths))
    super().__post_init__()

  # Helpers of the models' compact __call__ (nowrap: they only construct layers).
  @nn.nowrap
  def resolved_widths(self) -> dict[str, int]:
    """The widths to build with: `widths`, checked to have exactly the default's groups, or
    the defaults. Widths come from library code (a selection, a shrink): ValueError."""
    default, given = self.default_widths(), self.widths
    if given is None:
      return dict(default)
    missing = [g for g in default if g not in given]
    extra = [g for g in given if g not in default]
    if missing or extra:
      parts = [f'{kind} groups {gs}' for kind, gs in (('missing', missing), ('unknown', extra))
               if gs]
      raise ValueError(f"widths for {type(self).__name__} have {' and '.join(parts)}; "
                       f"the groups are {list(default)}.")
    bad = {g: w for g, w in given.items() if int(w) != w or w < 1}
    if bad:
      raise ValueError(f"widths for {type(self).__name__} must be positive integers, got {bad}.")
    return {g: int(given[g]) for g in default}

  @nn.nowrap
  def batch_norm(self, train: bool, name: str) -> norm.BatchNorm | nn.BatchNorm:
    return batch_norm(self.performance, train, self.bn_scale_init, name=name)

  @nn.nowrap
  def conv(self, features: int, kernel: int, stride: int = 1, name: str | None = None,
           torch_padding: bool = False) -> Conv:
    return conv(self.performance, features, kernel, stride, name, torch_padding)

  @nn.nowrap
  def select(self, group: str, width: int, train: bool) -> 'SelectBnRelu':
    return SelectBnRelu(width, train, self.performance, self.bn_scale_init, name=f'{group}_select')

  @nn.nowrap
  def classify(self, x):
    """The logits of the globally average-pooled feature map (the Dense layer `head`)."""
    return dense(self.num_classes, self.dense_init, name='head')(jnp.mean(x, axis=(1, 2)))


# The initialisers the `dense_init` setting names for every Dense kernel (biases start at 0).
DENSE_INITS = {
    'lecun_normal': "Flax's default, truncated normal of variance 1/fan_in",
    'normal_0.01': "N(0, 0.01^2), as [R]'s VGGs initialise their Linear layers",
}
_DENSE_KERNEL_INITS = {'lecun_normal': nn.initializers.lecun_normal(),
                       'normal_0.01': nn.initializers.normal(stddev=0.01)}


def batch_norm(performance: PerformanceOptions, train: bool, scale_init: float = 1.0,
               name: str | None = None) -> norm.BatchNorm | nn.BatchNorm:
  # momentum 0.9 here is PyTorch's momentum 0.1, the papers' setting.
  module = norm.BatchNorm if performance.batch_norm == 'jaxprune' else nn.BatchNorm
  # At 1, nn.BatchNorm's own default initialiser: the init program is the one it builds.
  gamma = nn.initializers.ones if scale_init == 1.0 else nn.initializers.constant(scale_init)
  return module(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                scale_init=gamma, name=name)


def dense(features: int, init: str = 'lecun_normal', name: str | None = None) -> nn.Dense:
  """A Dense layer whose kernel starts from `DENSE_INITS[init]` and whose bias from zero."""
  return nn.Dense(features, kernel_init=_DENSE_KERNEL_INITS[init],
                  bias_init=nn.initializers.zeros, name=name)


def conv(performance: PerformanceOptions, features: int, kernel: int, stride: int = 1,
         name: str | None = None, torch_padding: bool = False) -> Conv:
  # torch_padding pads k // 2 on every side as PyTorch does: 'SAME' pads a strided
  # convolution at the bottom and right only, sampling other positions than torchvision.
  padding = ((kernel // 2,) * 2,) * 2 if torch_padding else 'SAME'
  return Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
              use_bias=False, kernel_init=conv_init, impl=performance.conv_impl, name=name)


def blocks_per_stage(model: nn.Module, per_block: int, extra: int) -> int:
  """n of a `model` whose `depth` must be per_block * n + extra, n >= 1 (else ValueError)."""
  n, rest = divmod(model.depth - extra, per_block)
  if rest or n < 1:
    raise ValueError(f"{type(model).__name__} depth must be {per_block}n+{extra} with n >= 1, "
                     f"got {model.depth}.")
  return n


def check_image(x, need: int, what: str):
  """ConfigError unless the images are at least need x need: they are the user's dataset."""
  if min(x.shape[1:3]) < need:
    raise ConfigError(f"{what} at least {need}x{need} pixels, got {x.shape[1]}x{x.shape[2]}.")


class SelectBnRelu(nn.Module):
  """Reads a subset of a stream's channels, then BN and ReLU (network slimming's channel selection).

  The `indices/input_channels` variable (at first the first `width`) names the channels it
  reads. Shrinking slices it like any other channel axis, so a pruned model reads exactly
  the stream channels that survived; the stream itself is never changed.
  """
  width: int
  train: bool
  performance: PerformanceOptions
  bn_scale_init: float = 1.0

  @nn.compact
  def __call__(self, x):
    index = self.variable(INDICES, 'input_channels', jnp.arange, self.width, dtype=jnp.int32)
    x = jnp.take(x, index.value, axis=-1)
    return nn.relu(batch_norm(self.performance, self.train, self.bn_scale_init)(x))
