"""The XLA compiler options jaxprune compiles its model code with, per backend.

Every function jaxprune jits over a model is compiled with `compiler_options()`: on the CPU
backend, YNNPACK fusion limited to reductions (`xla_cpu_experimental_ynn_fusion_type`),
which makes XLA's own convolutions faster, the kernel gradient most; elsewhere nothing.
Programs that run once per model (`jit_once`: initialising the variables) add a lower LLVM
optimisation level on the CPU, which compiles them much faster with bitwise the same variables.

`xla_options` (a key of `options.XLA_OPTION_SETS`; callers pass `model.performance.xla_options`)
picks the set: 'jaxprune' is the above, 'xla' passes none (XLA's defaults). An option the
user sets in XLA_FLAGS keeps their setting, and a jaxlib that does not know an option
(probed once) gets no options.
"""

import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
from absl import logging

from jaxprune import storage
from jaxprune.errors import ConfigError
from jaxprune.kernels.options import XLA_OPTION_SETS

CACHE_ENV_VAR = 'JAX_COMPILATION_CACHE_DIR'
DEFAULT_CACHE_DIR = '~/.cache/jaxprune/xla'
CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}
CPU_ONCE_OPTIONS = {**CPU_OPTIONS, 'xla_backend_optimization_level': 1}


@functools.cache
def _accepted(options: tuple) -> bool:
  """Whether this jaxlib compiles with `options` (a tuple of items), probed on a scalar add."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options))(jnp.zeros((), jnp.float32))
  except jax.errors.JaxRuntimeError:
    return False
  return True


def compiler_options(backend: str | None = None, once: bool = False,
                     xla_options: str = 'jaxprune') -> dict:
  """The options for jitting model code on `backend` (default: JAX's default); `once` for a
  program that runs once per model."""
  if xla_options not in XLA_OPTION_SETS:
    # PerformanceOptions checked the user's value; anything else is a bug in the caller.
    raise ValueError(f"xla_options {xla_options!r} is not one of {', '.join(XLA_OPTION_SETS)}.")
  if xla_options == 'xla' or (backend or jax.default_backend()) != 'cpu':
    return {}
  user_flags = os.environ.get('XLA_FLAGS', '')
  wanted = CPU_ONCE_OPTIONS if once else CPU_OPTIONS
  options = {k: v for k, v in wanted.items() if f'--{k}' not in user_flags}
  return options if options and _accepted(tuple(sorted(options.items()))) else {}


def jit(fun: Callable, xla_options: str = 'jaxprune', **jit_kwargs) -> Callable:
  """`jax.jit(fun, **jit_kwargs)` with `compiler_options(xla_options=xla_options)`."""
  return jax.jit(fun, compiler_options=compiler_options(xla_options=xla_options), **jit_kwargs)


def jit_once(fun: Callable, xla_options: str = 'jaxprune', **jit_kwargs) -> Callable:
  """`jit` for a program that runs once per model: `compiler_options(once=True)`."""
  return jax.jit(fun, compiler_options=compiler_options(once=True, xla_options=xla_options),
                 **jit_kwargs)


def use_persistent_cache(directory: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache in `directory`; returns the directory used.

  None: JAX_COMPILATION_CACHE_DIR when set, else DEFAULT_CACHE_DIR; '': no cache. A local
  directory that cannot be created logs one warning and leaves the cache off (returns '');
  a path that is a file is a ConfigError, and so is a gs:// URL that cannot be used
  (`storage.check`): every compilation would otherwise wait on the bucket's retries. Call
  it before anything compiles: JAX decides once per process whether it uses the cache.
  """
  if directory is None:
    directory = os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
  if '://' in directory:
    storage.check(directory, 'compilation_cache_dir')
  elif directory:
    directory = os.path.expanduser(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
      raise ConfigError(f"compilation_cache_dir {directory!r} is a file; give a directory, "
                        "or '' for no cache.", settings=('compilation_cache_dir',))
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as error:
      # The cache only saves time: the run goes on, compiling everything.
      logging.warning('Cannot create the compilation cache directory %r (%s); compiling '
                      'without a persistent cache.', directory, error.strerror or error)
      directory = ''
  jax.config.update('jax_enable_compilation_cache', bool(directory))
  if directory:
    jax.config.update('jax_compilation_cache_dir', directory)
  return directory
