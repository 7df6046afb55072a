"""Random variables of a model's shapes, made on the host: tests of derived structure need
values that make every channel matter, not trained ones, and compiling `init` would cost
more than the test."""

import math

import jax
import numpy as np
from flax import traverse_util


def random_like(shapes, seed: int = 0):
  """A tree of numpy arrays shaped like `shapes` (leaves with .shape, e.g. eval_shape's).

  Kernels are normal with 1/sqrt(fan-in) scale, BatchNorm variances and scales near 1, and
  everything else (biases, means) small, so activations stay of order one through depth.
  """
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.tree.map(lambda s: s, shapes))
  out = {}
  for key, leaf in flat.items():
    shape = tuple(leaf.shape)
    name = str(key[-1])
    if name in ('kernel', 'embedding') and len(shape) > 1:
      value = rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))
    elif name in ('var', 'scale'):
      value = 1 + 0.3 * np.abs(rng.normal(size=shape))
    else:
      value = 0.1 * rng.normal(size=shape)
    out[key] = value.astype(np.float32)
  return traverse_util.unflatten_dict(out)
