"""The inputs of the built-in reference (tests/fixtures/builtin_reference.*): models, variables,
batches and selections, shared by the script that recorded it and the test that compares."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxprune import models
from random_variables import random_like

IMAGE = (32, 32, 3)
BATCH = 6
MODELS = ('tiny', 'vgg11', 'vgg11_mlp', 'resnet8', 'preresnet11', 'wrn10_1', 'densenet10')
# The oracle and the second-order criterion run one forward pass per channel.
CHEAP_MODELS = ('tiny', 'resnet8', 'preresnet11', 'wrn10_1', 'densenet10')
SELECTIONS = {
    'layer': {'ratio': 0.4},
    'global': {'ratio': 0.5},
    'global_l2': {'ratio': 0.5},
    'slimming': {'ratio': 0.3},
    'macs': {'target_macs': 0.5},
    'macs_l2': {'target_macs': 0.4, 'flops_penalty': 0.1},
}


def variables_for(model):
  """Random float variables at the model's shapes; integer leaves (channel selections) as
  `init` makes them."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + IMAGE))
  values = traverse_util.flatten_dict(random_like(shapes, seed=1))
  for key, leaf in traverse_util.flatten_dict(shapes).items():
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      values[key] = np.arange(leaf.shape[-1], dtype=leaf.dtype)
  return traverse_util.unflatten_dict(values)


def batches():
  rng = np.random.default_rng(2)
  return [{'image': jnp.asarray(rng.normal(size=(BATCH,) + IMAGE).astype(np.float32)),
           'label': jnp.asarray(rng.integers(0, 10, BATCH).astype(np.int32))}
          for _ in range(2)]
