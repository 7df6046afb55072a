"""jaxprune: structured (channel) pruning research in JAX and Flax.

`jaxprune.Pruner` prunes a user's own Flax model (jaxprune.pruner); it is imported on first
use, so `import jaxprune.<module>` stays as light as that module.
"""


def __getattr__(name):
  if name == 'Pruner':
    from jaxprune.pruner import Pruner
    return Pruner
  raise AttributeError(f"module 'jaxprune' has no attribute {name!r}")
