"""Building blocks shared by the models: widths handling and channel selection.

Every model in jaxprune is a plain Flax Linen module whose channel counts come from a
`widths` mapping (group name -> number of channels); `group_layers()` names, for every
width group, a layer whose outputs are that group's channels, which is how the channel
groups read off the model's program (`jaxprune.prune.program`) get the widths' names.
A subset of the groups is *prunable* (`prunable_groups()`). The models know nothing of
masks: masking, recording activations and shrinking happen on the traced program.

Every model also carries a `performance` field (`PerformanceOptions`), which chooses how
its convolutions and BatchNorms are computed (`conv`, `batch_norm` here); models derive
from `Network`, which makes the `widths` mapping immutable so that a model hashes and
compares by value, and the options become part of any cache keyed on the model.
"""

from typing import Mapping

import flax.linen as nn
import jax.numpy as jnp
from flax.core import FrozenDict

from jaxprune.kernels import norm
from jaxprune.kernels.conv import Conv
from jaxprune.kernels.options import PerformanceOptions

# Collection holding, for channel-selection layers, the indices of the stream
# channels the layer reads. It is structural data, not a learned parameter.
INDICES = 'indices'

conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class Network(nn.Module):
  """The base of jaxprune's models, which declare `widths` and `performance` fields.

  A widths dict would make the module unhashable, so construction (`build`, `clone`,
  a model made directly) freezes it: two models of the same class, widths and options
  are equal and hash alike, whatever mapping the widths came in.
  """

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


# The initialisers the `dense_init` setting names for every Dense layer's kernel (biases
# start at zero either way).
DENSE_INITS = {
    'lecun_normal': "Flax's default, truncated normal of variance 1/fan_in",
    'normal_0.01': "N(0, 0.01^2), as [R]'s VGGs initialise their Linear layers",
}
_DENSE_KERNEL_INITS = {'lecun_normal': nn.initializers.lecun_normal(),
                       'normal_0.01': nn.initializers.normal(stddev=0.01)}


def batch_norm(performance: PerformanceOptions, train: bool, scale_init: float = 1.0,
               name: str | None = None) -> norm.BatchNorm | nn.BatchNorm:
  # momentum 0.9 here is PyTorch's momentum 0.1, the papers' setting. norm.BatchNorm is
  # nn.BatchNorm's function and variables with a backward pass of fewer memory passes.
  module = norm.BatchNorm if performance.batch_norm == 'jaxprune' else nn.BatchNorm
  # ones (not constant(1.0)) at 1: the initial variables stay bit-identical to before.
  gamma = nn.initializers.ones if scale_init == 1.0 else nn.initializers.constant(scale_init)
  return module(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                scale_init=gamma, name=name)


def dense(features: int, init: str = 'lecun_normal', name: str | None = None) -> nn.Dense:
  """A Dense layer whose kernel starts from `DENSE_INITS[init]` and whose bias from zero."""
  return nn.Dense(features, kernel_init=_DENSE_KERNEL_INITS[init],
                  bias_init=nn.initializers.zeros, name=name)


def conv(performance: PerformanceOptions, features: int, kernel: int, stride: int = 1,
         name: str | None = None) -> Conv:
  # conv.Conv has nn.Conv's parameters (and is one), but can compute small CPU feature
  # maps as patches x matrix, where XLA's native convolution is many times slower.
  return Conv(features, (kernel, kernel), strides=(stride, stride), padding='SAME',
              use_bias=False, kernel_init=conv_init, impl=performance.conv_impl, name=name)


def resolve_widths(model_name: str, default: Mapping[str, int],
                   given: Mapping[str, int] | None) -> dict[str, int]:
  """Returns the widths to build with, checking `given` has exactly the default's groups.

  Widths come from library code (a selection, a shrink), so a wrong mapping is a bug
  there: ValueError.
  """
  if given is None:
    return dict(default)
  missing = [g for g in default if g not in given]
  extra = [g for g in given if g not in default]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"missing groups {missing}")
    if extra:
      parts.append(f"unknown groups {extra}")
    raise ValueError(f"widths for {model_name} have {' and '.join(parts)}; "
                     f"the groups are {list(default)}.")
  bad = {g: w for g, w in given.items() if int(w) != w or w < 1}
  if bad:
    raise ValueError(f"widths for {model_name} must be positive integers, got {bad}.")
  return {g: int(given[g]) for g in default}


class SelectBnRelu(nn.Module):
  """Reads a subset of a stream's channels, then BN and ReLU (network slimming's channel selection).

  The subset's size is the group's width; which stream channels it holds is the
  `indices/input_channels` variable, initialised to the first `width` channels.
  Shrinking slices that variable like any other tagged axis, so a pruned model
  keeps reading exactly the stream channels that survived, while the stream
  itself (a residual sum or a concatenation) is never changed.
  """
  width: int
  train: bool
  performance: PerformanceOptions
  bn_scale_init: float = 1.0

  @nn.compact
  def __call__(self, x):
    index = self.variable(INDICES, 'input_channels', lambda: jnp.arange(self.width, dtype=jnp.int32))
    x = jnp.take(x, index.value, axis=-1)
    return nn.relu(batch_norm(self.performance, self.train, self.bn_scale_init)(x))
