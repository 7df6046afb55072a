"""The performance options: which convolution, BatchNorm and XLA option set a run computes with.

They change a network's floating-point rounding, which can tip which channels a criterion
ranks lowest, so they are one recorded value, `PerformanceOptions`, passed down: every model
carries one as its `performance` field (part of its hash, and so of every cache of compiled
steps keyed on the model). Only entry points read the environment
(`PerformanceOptions.from_env`); library code given no options uses the defaults.
"""

import dataclasses
import os
from typing import Mapping

from jaxprune.errors import choose

CONV_IMPLS = {
    'auto': "on the CPU, 'patches' for tiny output maps and 'native' otherwise; elsewhere "
            "'native' (jaxprune.kernels.conv)",
    'native': "lax.conv_general_dilated, what nn.Conv computes",
    'patches': 'im2col: the strided views of the padded input times the kernel, one matmul',
}
BATCH_NORMS = {
    'jaxprune': "jaxprune.kernels.norm.BatchNorm: nn.BatchNorm's function with a leaner "
                'backward pass',
    'flax': 'nn.BatchNorm',
}
XLA_OPTION_SETS = {
    'jaxprune': 'the compiler options of jaxprune.kernels.compiler for this backend',
    'xla': "no compiler options: XLA's defaults",
}

# Each option's registry, and the environment variable `from_env` reads it from.
_REGISTRIES = {'conv_impl': CONV_IMPLS, 'batch_norm': BATCH_NORMS,
               'xla_options': XLA_OPTION_SETS}
ENV_VARS = {'conv_impl': 'JAXPRUNE_CONV_IMPL', 'batch_norm': 'JAXPRUNE_BATCH_NORM',
            'xla_options': 'JAXPRUNE_XLA_OPTIONS'}


def env_value(name: str, environ: Mapping[str, str] = os.environ) -> str | None:
  """Option `name`'s value in its environment variable (trimmed, lower case); None if unset."""
  return environ.get(ENV_VARS[name], '').strip().lower() or None


@dataclasses.dataclass(frozen=True)
class PerformanceOptions:
  """How a model's code is computed: `conv_impl`, `batch_norm` and `xla_options` are keys
  of CONV_IMPLS, BATCH_NORMS and XLA_OPTION_SETS."""
  conv_impl: str = 'auto'
  batch_norm: str = 'jaxprune'
  xla_options: str = 'jaxprune'

  def __post_init__(self):
    for name, registry in _REGISTRIES.items():
      choose(name, getattr(self, name), registry, setting=name)

  @classmethod
  def from_env(cls, environ: Mapping[str, str] = os.environ) -> 'PerformanceOptions':
    """The options the ENV_VARS name (case-insensitive; unset or empty: the default). A value
    not allowed is a ConfigError naming the variable, which is what the user typed."""
    values = {}
    for name, registry in _REGISTRIES.items():
      value = env_value(name, environ)
      if value is not None:
        choose(ENV_VARS[name], value, registry)
        values[name] = value
    return cls(**values)

  def as_dict(self) -> dict[str, str]:
    """The options by name, for records (e.g. a run's result or config file)."""
    return dataclasses.asdict(self)
