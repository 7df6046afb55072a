"""A researcher's own Flax model in the main job: `--model=package.module:factory`.

The factory is imported from the working directory (or anything on PYTHONPATH) and called
with the keyword arguments it declares among `num_classes` (int), `image_shape` ((H, W, C))
and `rngs` (an `nnx.Rngs` made from the run's seed). It returns a Flax NNX module, which
jaxprune switches with `.train()` / `.eval()` and calls as `module(images) -> logits`, or a
Flax Linen module called as `module.apply(variables, images, train=bool)` (the flax
examples' convention) and initialised with `init(rngs, images, train=False)`.

`OwnModel` gives both the built-in models' interface: `init(rng, x)` -> {'params': ...,
'batch_stats': ...} and `apply(variables, x, train=..., mutable=['batch_stats'])`.
Everything the forward pass may change lives in 'batch_stats': BatchNorm statistics, an
NNX module's RNG keys (as key data) and counts, and for a Linen module a dropout key that
every training call advances, so a resumed run draws the masks the uninterrupted one did.
Linen variables created with `nn.with_logical_partitioning` are unboxed.

A pruned own model (`kept` channels) runs the full model's program (`jaxprune.prune.program`)
on the smaller arrays, with no code of its author's.
"""

import dataclasses
import functools
import hashlib
import importlib
import inspect
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxprune.errors import ConfigError
from jaxprune.kernels.options import PerformanceOptions

PARAMS, STATE = 'params', 'batch_stats'
# The Linen dropout key jaxprune keeps in the state collection (module docstring).
DROPOUT_KEY = '__dropout_key__'


def is_own(name: str) -> bool:
  """Whether a `model` value names a factory (package.module:factory), not a built-in model."""
  return ':' in name


def load_factory(spec: str) -> Callable:
  """The factory `spec` names; one sentence (ConfigError) when it cannot be imported."""
  module_name, _, attribute = spec.partition(':')
  if not module_name or not attribute:
    raise ConfigError(f'model={spec} is not package.module:factory (e.g. '
                      'examples.mobilenet_v2:factory).', settings=('model',))
  try:
    module = importlib.import_module(module_name)
  except ImportError as error:
    raise ConfigError(f'model={spec}: cannot import {module_name} ({error}); run from the '
                      'directory that holds it or add it to PYTHONPATH.',
                      settings=('model',)) from None
  factory = getattr(module, attribute, None)
  if not callable(factory):
    raise ConfigError(f'model={spec}: {module_name} has no function {attribute!r}.',
                      settings=('model',))
  return factory


def _call_factory(spec: str, num_classes: int, image_shape, seed: int):
  factory = load_factory(spec)
  try:
    accepted = inspect.signature(factory).parameters
  except (TypeError, ValueError):
    accepted = {}
  arguments = {'num_classes': num_classes, 'image_shape': tuple(image_shape),
               'rngs': nnx.Rngs(seed)}
  module = factory(**{k: v for k, v in arguments.items() if k in accepted})
  if not isinstance(module, (nnx.Module, nn.Module)):
    raise ConfigError(f'model={spec}: the factory returned a {type(module).__name__}, not a '
                      'Flax NNX or Linen module.', settings=('model',))
  return module


def _is_key(value) -> bool:
  return jax.dtypes.issubdtype(jnp.result_type(value), jax.dtypes.prng_key)


@dataclasses.dataclass(frozen=True)
class OwnModel:
  """The model of factory `spec` (given `num_classes`, `image_shape`) at its full width, or
  pruned to `kept`: ((group, kept channel indices), ...).

  Compares and hashes by value, as built-in models do, so compiled steps are shared by every
  run of the same network. `performance` sets jaxprune's compiled programs only: the model's
  own layers compute as their author wrote them.
  """
  spec: str
  num_classes: int
  image_shape: tuple
  kept: tuple = ()
  performance: PerformanceOptions = PerformanceOptions()

  def full(self) -> 'OwnModel':
    return dataclasses.replace(self, kept=())

  def kept_indices(self) -> dict[str, np.ndarray]:
    return {g: np.asarray(k, np.int64) for g, k in self.kept}

  def with_kept(self, kept: Mapping[str, Any]) -> 'OwnModel':
    """This model pruned to `kept` ({group: indices, or a count meaning the first ones})."""
    items = tuple(sorted((g, tuple(int(i) for i in (range(k) if np.ndim(k) == 0 else k)))
                         for g, k in kept.items()))
    return dataclasses.replace(self, kept=items)

  def _template(self) -> '_Template':
    return _cached_template(self.spec, self.num_classes, tuple(self.image_shape))

  def init(self, rng, x, train: bool = False) -> dict:
    """The full network's variables from key `rng` (any `x` of the image shape); a pruned
    network's come from `program.fresh_init`."""
    del train
    if self.kept:
      raise ValueError('initialise the full model and shrink it (program.fresh_init); a '
                       'pruned own model has no initialiser of its own.')
    template = self._template()
    if not template.nnx:
      return template.linen_init(rng, jnp.asarray(x, jnp.float32))
    seed = int(jax.random.randint(rng, (), 0, 2 ** 31 - 1))
    return template.variables_of(_call_factory(self.spec, self.num_classes, self.image_shape,
                                               seed))

  def apply(self, variables, x, train: bool = False, mutable=(), **unused):
    """Linen-style: the logits, or (logits, {'batch_stats': new state}) when 'batch_stats'
    is in `mutable`."""
    del unused
    wants_state = STATE in (mutable or ())
    if self.kept:
      from jaxprune.prune import program
      return program.run_pruned(self, variables, x, train=train, mutable=wants_state)
    logits, state = self._template().call(variables, x, train)
    return (logits, {STATE: state}) if wants_state else logits

  def init_shapes(self) -> dict:
    """The full network's variables as shapes and dtypes, computing nothing."""
    return self._template().shapes()

  def rng_leaves(self) -> tuple:
    """The state leaves that are random keys or counts, never channels."""
    template = self._template()
    if not template.nnx:
      return ((STATE, DROPOUT_KEY),)
    return tuple(key for key, (_, v) in zip(template.keys, template.flat)
                 if isinstance(v, (nnx.RngKey, nnx.RngCount)))

  def digest(self) -> str:
    """A digest of the factory's traced full-width program: an edited model is another baseline."""
    return self._template().digest()


def first_output(out):
  """A model's logits: the first of several outputs, (logits, features, ...)."""
  return out[0] if isinstance(out, (tuple, list)) else out


class _Template:
  """One factory's module, called functionally on variables given as a dict."""

  def __init__(self, spec, num_classes, image_shape):
    self.image_shape = image_shape
    self.module = _call_factory(spec, num_classes, image_shape, 0)
    self.nnx = isinstance(self.module, nnx.Module)
    if self.nnx:
      self.graphdef, state = nnx.split(self.module)
      self.flat = list(nnx.to_flat_state(state))
      self.keys = [(PARAMS if isinstance(v, nnx.Param) else STATE, *map(str, path))
                   for path, v in self.flat]

  @functools.cache
  def shapes(self) -> dict:
    if self.nnx:
      return jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)),
                          self.variables_of(self.module))
    x = jnp.zeros((1,) + tuple(self.image_shape), jnp.float32)
    return jax.eval_shape(lambda: self.linen_init(jax.random.key(0), x))

  def linen_init(self, rng, x) -> dict:
    """A Linen module's variables, with jaxprune's dropout key in the state."""
    variables = nn.meta.unbox(self.module.init({'params': rng, 'dropout': rng}, x, train=False))
    return {**variables, STATE: {**variables.get(STATE, {}),
                                 DROPOUT_KEY: jax.random.key_data(jax.random.fold_in(rng, 1))}}

  def variables_of(self, module) -> dict:
    nested = {}
    for key, (_, variable) in zip(self.keys, nnx.to_flat_state(nnx.state(module))):
      value = variable.get_value()
      nested[key] = jax.random.key_data(value) if _is_key(value) else value
    return traverse_util.unflatten_dict(nested)

  def call(self, variables, x, train: bool):
    flat = traverse_util.flatten_dict(dict(variables))
    if self.nnx:
      pairs = []
      for key, (path, variable) in zip(self.keys, self.flat):
        value = flat[key]
        if _is_key(variable.get_value()):
          value = jax.random.wrap_key_data(value)
        pairs.append((path, variable.replace(value=value)))
      module = nnx.merge(self.graphdef, nnx.from_flat_state(pairs))
      module.train() if train else module.eval()
      return first_output(module(x)), self.variables_of(module).get(STATE, {})
    key = jax.random.wrap_key_data(flat.pop((STATE, DROPOUT_KEY)))
    stats = {k[1:]: v for k, v in flat.items() if k[0] == STATE}
    given = traverse_util.unflatten_dict(flat)
    dropout, advanced = jax.random.split(key)
    if train:
      out, updated = self.module.apply(given, x, train=True, mutable=[STATE],
                                       rngs={'dropout': dropout})
      new = traverse_util.flatten_dict(dict(updated.get(STATE, {})))
    else:
      out, new, advanced = self.module.apply(given, x, train=False), stats, key
    new = {**new, (DROPOUT_KEY,): jax.random.key_data(advanced)}
    return first_output(out), traverse_util.unflatten_dict(new)

  @functools.cache
  def digest(self) -> str:
    x = jax.ShapeDtypeStruct((1,) + tuple(self.image_shape), jnp.float32)
    text = str(jax.make_jaxpr(lambda v, x: self.call(v, x, True))(self.shapes(), x))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@functools.lru_cache(maxsize=16)
def _cached_template(spec: str, num_classes: int, image_shape: tuple) -> _Template:
  return _Template(spec, num_classes, image_shape)
