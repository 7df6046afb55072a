"""Channel importance criteria: model + variables (+ batches) -> {group: (C,) scores}.

Higher score = channel worth keeping. `score(name, ...)` is the one-shot entry point;
iterative pruning uses the `Criterion` protocol it is built from:

    state = criterion.init(structure, rng)
    state = criterion.accumulate(state, model, variables, masks, batch)  # pure, jittable
    scores = criterion.finalize(state, model, variables)

Conventions:

* Channels already removed by `masks` get the criterion's natural value (0 for the data
  criteria, whose signals vanish with the channel); selection excludes them itself.
* Data criteria run the model's program in eval mode (BN running statistics), so an
  example's signal does not depend on its batch and the network scored is the one
  deployed; the loss is softmax cross-entropy. Masks multiply every consumer's input (a
  zero is exactly removal). A channel's activation z is the masked feature map at its
  group's record point (`jaxpr.Graph.record_points`: after BN and the nonlinearity,
  before any pooling); as a ReLU passes z * dL/dz only where z > 0, z * dL/dz there is
  the "gate after BN" of [M] 2019.
* Gradient criteria multiply (B, C) gates of ones onto the masks and take ONE backward
  pass w.r.t. the gates only: with CE_n the loss of example n, the gate gradient is
  g_nk = sum_hw z_nhwk * dCE_n/dz_nhwk.

The criteria (names as accepted by `--criterion`):

* `random`: uniform in [0, 1), from `rng` (key 0 when none is given).
* `l1`, `l2`: sum |w| and sqrt(sum w^2) of the channel's filter; `min_weight`: mean
  w^2 ([M]'s "minimum weight"). The filter is every Conv/Dense kernel slice (biases
  excluded) whose OUTPUT axis the group tags; for a channel-selection group (it tags an
  `indices` leaf and has no producing filter) the slices whose INPUT axis it tags; for a
  group no kernel's output axis holds (attention heads) every kernel slice it tags.
* `bn_scale`: |gamma| of the BatchNorm whose scale the group tags (network slimming).
  A group with no such BN has no gamma to rank by: `init` raises a ConfigError naming
  those groups rather than mix in another scale.
* `mean_activation`, `activation_std`: mean and population standard deviation of z
  over examples and positions; `apoz`: 1 - the fraction of z that are exactly zero
  (Hu et al. 2016).
* `taylor` ([M] 2017): mean over examples of |g_nk| / (H*W). Variants:
  `taylor_signed_mean`, |sum_n g_nk| / (N*H*W); `taylor_abs_elementwise`, mean over
  examples of mean_hw |z * dL/dz| (gradient w.r.t. zero offsets added to z).
* `taylor_fo` ([M] 2019): (mean_n g_nk)^2 per step, averaged over steps.
* `fisher` (Theis et al., [C]): 1/(2N) sum_n g_nk^2 over all N examples.
* `second_order` (OBD-like): with L(s) the mean loss as a function of a (C,) channel
  scale s (ones, times the mask), removing channel k changes L by about
  -dL/ds_k + 0.5 d2L/ds_k^2; the score is its absolute value. Both derivatives come from
  forward-over-forward mode (jvp of jvp along e_k): exact like jvp of grad, but cheaper
  to run and compile.
* `oracle` ([M]): |L(mask with channel k removed) - L(mask)|, L the mean loss over all
  examples of the batches (see `Oracle`).
"""

import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxprune.kernels import compiler
from jaxprune.prune import shrink
from jaxprune.prune import structure as structure_lib
from jaxprune.prune.program import Program
from jaxprune.errors import ConfigError, choose
from jaxprune.models.layers import INDICES
from jaxprune.models.own import first_output

State = Any
Scores = dict[str, np.ndarray]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable facts riding in a criterion's state through jit without becoming inputs."""
  value: Any


def _groups(state) -> tuple[tuple[str, int], ...]:
  return state['groups'].value


def _group_table(structure) -> _Static:
  return _Static(tuple((g, int(structure.widths[g])) for g in structure.prunable))


def _full_masks(structure, masks) -> dict[str, jax.Array]:
  """Every prunable group's (C,) float mask, ones where none is given (a fixed pytree for jit)."""
  masks = shrink.check_masks(structure, masks)
  return {g: jnp.asarray(masks[g], jnp.float32) if g in masks
          else jnp.ones((structure.widths[g],), jnp.float32) for g in structure.prunable}


def _example_losses(model, variables, x, labels, masks) -> jax.Array:
  logits = first_output(model.apply(variables, x, train=False, masks=masks))
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _activations(model, variables, x, masks) -> dict[str, jax.Array]:
  _, state = model.apply(variables, x, train=False, masks=masks, mutable=['intermediates'])
  return {g: acts[0] for g, acts in state['intermediates'].items()}


def _activation_shapes(model, variables, x, masks) -> dict[str, tuple[int, ...]]:
  shapes = jax.eval_shape(functools.partial(_activations, model), variables, x, masks)
  return {g: s.shape for g, s in shapes.items()}


def _zeros(groups) -> dict[str, jax.Array]:
  return {g: jnp.zeros((c,), jnp.float32) for g, c in groups}


def _as_numpy(scores: Mapping) -> Scores:
  return {g: np.asarray(v, np.float32) for g, v in scores.items()}


class Criterion:
  """The protocol of every criterion: frozen dataclasses, hashable as static jit arguments."""
  name: str
  needs_data: bool = True

  def init(self, structure: structure_lib.Structure, rng=None) -> State:
    """A fresh accumulator for the structure's prunable groups."""
    return {'groups': _group_table(structure)}

  def accumulate(self, state: State, model: Program, variables, masks, batch) -> State:
    """Adds one batch's evidence; pure and jittable. Data-free criteria return `state`."""
    return state

  def finalize(self, state: State, model: Program, variables) -> Scores:
    """{group: (C,) float32 numpy scores} from the accumulated state."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Random(Criterion):
  name: str = 'random'
  needs_data = False

  def init(self, structure, rng=None):
    if rng is None or isinstance(rng, (int, np.integer)):
      rng = jax.random.key(0 if rng is None else rng)
    keys = jax.random.split(rng, len(structure.prunable))
    return {'groups': _group_table(structure),
            'scores': {g: jax.random.uniform(k, (structure.widths[g],))
                       for g, k in zip(structure.prunable, keys)}}

  def finalize(self, state, model, variables):
    return _as_numpy(state['scores'])


def _kernel_slices(structure, group: str,
                   criterion: str) -> tuple[tuple[tuple[str, ...], int], ...]:
  """(kernel leaf, channel axis) pairs holding a group's filter (module docstring); a group
  with no filter is a ConfigError: the user chose `criterion` for a model it cannot score."""
  tags_of = structure.axes
  selection = any(key[0] == INDICES and group in tags for key, tags in tags_of.items())
  role = -2 if selection else -1
  kernels = {key: tags for key, tags in tags_of.items()
             if key[0] == 'params' and key[-1] == 'kernel' and len(tags) >= 2}
  found = tuple((key, len(tags) + role) for key, tags in kernels.items() if tags[role] == group)
  if not found and not selection:
    # No kernel's output axis (attention heads): every kernel slice holding the group.
    found = tuple((key, axis) for key, tags in kernels.items()
                  for axis, tag in enumerate(tags) if tag == group)
  if not found:
    where = 'input axis' if selection else 'axis'
    raise ConfigError(f"criterion={criterion} weighs filters, but group {group!r} tags no "
                      f"kernel {where}; use a data criterion such as taylor.",
                      settings=('criterion',))
  return found


@dataclasses.dataclass(frozen=True)
class WeightNorm(Criterion):
  name: str = 'l1'
  needs_data = False
  _NORMS = {'l1': lambda w: np.sum(np.abs(w), axis=0),
            'l2': lambda w: np.sqrt(np.sum(np.square(w), axis=0)),
            'min_weight': lambda w: np.mean(np.square(w), axis=0)}

  def init(self, structure, rng=None):
    return {'groups': _group_table(structure),
            'slices': _Static(tuple((g, _kernel_slices(structure, g, self.name))
                                    for g in structure.prunable))}

  def finalize(self, state, model, variables):
    # On the host in numpy: a handful of reductions, not worth compiling per shape.
    flat = traverse_util.flatten_dict(model.leaf_view(variables))
    scores = {}
    for group, slices in state['slices'].value:
      per_channel = [np.moveaxis(np.asarray(flat[key], np.float64), axis, -1)
                     for key, axis in slices]
      w = np.concatenate([p.reshape(-1, p.shape[-1]) for p in per_channel], axis=0)
      scores[group] = self._NORMS[self.name](w)
    return _as_numpy(scores)


@dataclasses.dataclass(frozen=True)
class BnScale(Criterion):
  name: str = 'bn_scale'
  needs_data = False

  def init(self, structure, rng=None):
    scales = {g: [k for k, tags in structure.axes.items()
                  if k[0] == 'params' and k[-1] == 'scale' and tags == (g,)]
              for g in structure.prunable}
    missing = [g for g, keys in scales.items() if len(keys) != 1]
    if missing:
      raise ConfigError(f"criterion=bn_scale ranks channels by the scale of the BatchNorm "
                        f"producing them, but groups {missing} have no single BatchNorm; "
                        "choose another criterion or a model whose pruned channels all come "
                        "out of a BatchNorm.", settings=('criterion', 'model'))
    return {'groups': _group_table(structure),
            'scales': _Static(tuple((g, keys[0]) for g, keys in scales.items()))}

  def finalize(self, state, model, variables):
    flat = traverse_util.flatten_dict(model.leaf_view(variables))
    return _as_numpy({g: np.abs(np.asarray(flat[key])) for g, key in state['scales'].value})


@dataclasses.dataclass(frozen=True)
class Activation(Criterion):
  name: str = 'mean_activation'

  def init(self, structure, rng=None):
    groups = _group_table(structure)
    return {'groups': groups, 'count': _zeros(groups.value),
            'mean': _zeros(groups.value), 'm2': _zeros(groups.value)}

  def accumulate(self, state, model, variables, masks, batch):
    masks = _full_masks(model.structure, masks)
    acts = _activations(model, variables, batch['image'], masks)
    count, mean, m2 = dict(state['count']), dict(state['mean']), dict(state['m2'])
    for g, _ in _groups(state):
      z = acts[g].reshape(-1, acts[g].shape[-1]).astype(jnp.float32)
      n_b = jnp.float32(z.shape[0])
      if self.name == 'apoz':  # the running "mean" is then the nonzero fraction, 1 - APoZ
        z = (z != 0).astype(jnp.float32)
      mean_b = jnp.mean(z, axis=0)
      m2_b = jnp.sum(jnp.square(z - mean_b), axis=0) if self.name == 'activation_std' else 0.0
      # Chan et al.'s pairwise update: exact mean and variance over all batches
      # without the cancellation of a running sum of squares.
      total = count[g] + n_b
      delta = mean_b - mean[g]
      mean[g] = mean[g] + delta * (n_b / total)
      m2[g] = m2[g] + m2_b + jnp.square(delta) * (count[g] * n_b / total)
      count[g] = total
    return {'groups': state['groups'], 'count': count, 'mean': mean, 'm2': m2}

  def finalize(self, state, model, variables):
    if self.name == 'activation_std':
      return _as_numpy({g: jnp.sqrt(state['m2'][g] / state['count'][g])
                        for g, _ in _groups(state)})
    return _as_numpy(state['mean'])


def gate_gradients(model, variables, masks, batch) -> tuple[dict, dict]:
  """({group: (B, C) gate gradients g_nk}, {group: positions per example}) from one forward
  and one backward pass w.r.t. the gates only; `masks` must be the full (C,) masks."""
  x, labels = batch['image'], batch['label']
  b = x.shape[0]
  # Positions per example: H * W for a conv activation, 1 for a dense one.
  positions = {g: math.prod(s[1:-1])
               for g, s in _activation_shapes(model, variables, x, masks).items()}

  def summed_loss(gates):
    gated = {g: gates[g] * m for g, m in masks.items()}
    return jnp.sum(_example_losses(model, variables, x, labels, gated))

  ones = {g: jnp.ones((b,) + m.shape, jnp.float32) for g, m in masks.items()}
  return jax.grad(summed_loss)(ones), positions


def activation_gradients(model, variables, masks, batch) -> tuple[dict, dict]:
  """({group: z}, {group: dCE_n/dz}), each shaped like the activation, from one backward
  pass w.r.t. zero offsets added to the gated activations; `masks` must be the full masks."""
  x, labels = batch['image'], batch['label']
  shapes = _activation_shapes(model, variables, x, masks)

  def summed_loss(offsets):
    out, state = model.apply(variables, x, train=False, masks=masks,
                             mutable=['intermediates'], offsets=offsets)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        first_output(out).astype(jnp.float32), labels)
    return jnp.sum(losses), {g: a[0] for g, a in state['intermediates'].items()}

  zeros = {g: jnp.zeros(shape, jnp.float32) for g, shape in shapes.items()}
  grads, acts = jax.grad(summed_loss, has_aux=True)(zeros)
  return acts, grads


@dataclasses.dataclass(frozen=True)
class GateGradient(Criterion):
  name: str = 'taylor'

  def init(self, structure, rng=None):
    groups = _group_table(structure)
    return {'groups': groups, 'sum': _zeros(groups.value),
            'count': jnp.zeros((), jnp.float32)}

  def accumulate(self, state, model, variables, masks, batch):
    masks = _full_masks(model.structure, masks)
    b = batch['image'].shape[0]
    total = dict(state['sum'])
    if self.name == 'taylor_abs_elementwise':
      acts, grads = activation_gradients(model, variables, masks, batch)
      for g, _ in _groups(state):
        per_element = jnp.abs(acts[g] * grads[g]).reshape(b, -1, acts[g].shape[-1])
        total[g] += jnp.sum(jnp.mean(per_element, axis=1), axis=0)
    else:
      grads, positions = gate_gradients(model, variables, masks, batch)
      for g, _ in _groups(state):
        gn = grads[g]
        if self.name == 'taylor':
          total[g] += jnp.sum(jnp.abs(gn), axis=0) / positions[g]
        elif self.name == 'taylor_signed_mean':
          total[g] += jnp.sum(gn, axis=0) / positions[g]
        elif self.name == 'taylor_fo':
          total[g] += jnp.square(jnp.mean(gn, axis=0))
        else:
          total[g] += jnp.sum(jnp.square(gn), axis=0)
    # taylor_fo averages over steps, the others over examples.
    step = 1.0 if self.name == 'taylor_fo' else float(b)
    return {'groups': state['groups'], 'sum': total, 'count': state['count'] + step}

  def finalize(self, state, model, variables):
    n = 2 * state['count'] if self.name == 'fisher' else state['count']
    signed = self.name == 'taylor_signed_mean'
    return _as_numpy({g: (jnp.abs(s) if signed else s) / n for g, s in state['sum'].items()})


# Bound on the activations of the removals in flight at once. On a CPU narrow chunks run
# fastest (XLA hoists the unchanged prefix out of the chunk loop and a small working set
# stays in cache); accelerators want wide batches and have the memory for them.
_CPU_MEMORY_BYTES = 8 * 2 ** 20
_ACCELERATOR_MEMORY_BYTES = 2 ** 30


def _suffix_bytes(model, variables, x, masks, factor: int) -> dict[str, int]:
  """Per group, `factor` x the bytes of the gated activations from that group's gate on
  (sown in forward order): a rough measure of what each vmapped removal adds, since a
  removal in group g changes only what follows g's gate."""
  shapes = list(_activation_shapes(model, variables, x, masks).items())
  sizes = [4 * math.prod(shape) for _, shape in shapes]
  return {g: factor * sum(sizes[i:]) for i, (g, _) in enumerate(shapes)}


def _over_one_hots(fn: Callable, channels: int, bytes_per_removal: int,
                   requested: int | None):
  """fn(e) (a pytree) stacked over all `channels` one-hot rows e, vmapped over as many at a
  time as fit the memory bound at `bytes_per_removal` each, at most `requested`."""
  cpu = jax.default_backend() == 'cpu'
  memory_bytes = _CPU_MEMORY_BYTES if cpu else _ACCELERATOR_MEMORY_BYTES
  chunk = max(1, min(memory_bytes // max(1, bytes_per_removal), requested or channels, channels))
  n = -(-channels // chunk)
  chunk = -(-channels // n)  # the same number of chunks with the least padding
  # Rows past `channels` are all zero (nothing removed) and are dropped below.
  eye = jnp.eye(n * chunk, channels, dtype=jnp.float32)
  if n == 1:
    return jax.tree.map(lambda a: a[:channels], jax.vmap(fn)(eye))
  out = jax.lax.map(jax.vmap(fn), eye.reshape(n, chunk, channels))
  return jax.tree.map(lambda a: a.reshape((n * chunk,) + a.shape[2:])[:channels], out)


@dataclasses.dataclass(frozen=True)
class Oracle(Criterion):
  """|L(without channel k) - L| by vmapping the loss over one-hot removals.

  With `share_prefix` (the default) each group's loss is vmapped over removals of its own
  channels only; vmap batches only what depends on them, so the layers before the group's
  gate run unbatched and XLA hoists them out of the `lax.map` over chunks: once per batch.
  Without it one program vmaps whole-network masks over all channels: one model to compile
  instead of one per group, but every removal pays a full forward pass. Removals in flight
  at once are bounded by their activations' memory and capped by `chunk_size`.
  """
  name: str = 'oracle'
  chunk_size: int | None = None
  share_prefix: bool = True

  def init(self, structure, rng=None):
    groups = _group_table(structure)
    return {'groups': groups, 'change': _zeros(groups.value),
            'count': jnp.zeros((), jnp.float32)}

  def accumulate(self, state, model, variables, masks, batch):
    groups = _groups(state)
    masks = _full_masks(model.structure, masks)
    x, labels = batch['image'], batch['label']
    loss_sum = lambda m: jnp.sum(_example_losses(model, variables, x, labels, m))
    suffix_bytes = _suffix_bytes(model, variables, x, masks, factor=2)
    removed = {}
    if self.share_prefix:
      for g, c in groups:
        def without(e, g=g):
          return loss_sum({**masks, g: masks[g] * (1 - e)})
        removed[g] = _over_one_hots(without, c, suffix_bytes[g], self.chunk_size)
    else:
      widths = [c for _, c in groups]
      splits = np.cumsum(widths)[:-1]

      def without_any(e):
        return loss_sum({g: masks[g] * (1 - part)
                         for (g, _), part in zip(groups, jnp.split(e, splits))})

      flat = _over_one_hots(without_any, sum(widths), max(suffix_bytes.values()),
                            self.chunk_size)
      removed = {g: part for (g, _), part in zip(groups, jnp.split(flat, splits))}
    base = loss_sum(masks)
    # Removing a channel that is already gone changes nothing; say so exactly
    # rather than leave the rounding difference of two evaluation orders.
    change = {g: state['change'][g] + jnp.where(masks[g] == 0, 0.0, removed[g] - base)
              for g, _ in groups}
    return {'groups': state['groups'], 'change': change, 'count': state['count'] + x.shape[0]}

  def finalize(self, state, model, variables):
    return _as_numpy({g: jnp.abs(c / state['count']) for g, c in state['change'].items()})


@dataclasses.dataclass(frozen=True)
class SecondOrder(Criterion):
  name: str = 'second_order'
  chunk_size: int | None = None

  def init(self, structure, rng=None):
    groups = _group_table(structure)
    return {'groups': groups, 'grad': _zeros(groups.value),
            'hess': _zeros(groups.value), 'count': jnp.zeros((), jnp.float32)}

  def accumulate(self, state, model, variables, masks, batch):
    masks = _full_masks(model.structure, masks)
    x, labels = batch['image'], batch['label']
    b = x.shape[0]
    # Three tangent streams (two first-order, one second-order) per removal.
    suffix_bytes = _suffix_bytes(model, variables, x, masks, factor=3)
    grad_sum, hess_sum = dict(state['grad']), dict(state['hess'])
    for g, c in _groups(state):
      # Only this group's scale is an argument: the layers before its gate are constants.
      def mean_loss(scale, g=g):
        return jnp.mean(_example_losses(model, variables, x, labels,
                                        {**masks, g: masks[g] * scale}))
      ones = jnp.ones((c,), jnp.float32)

      def derivatives(e):
        # Along e = e_k the first jvp is dL/ds_k, its jvp d2L/ds_k^2; XLA's CSE merges
        # the two identical first-order tangent streams.
        first = lambda s: jax.jvp(mean_loss, (s,), (e,))[1]
        return jax.jvp(first, (ones,), (e,))

      grad, hess = _over_one_hots(derivatives, c, suffix_bytes[g], self.chunk_size)
      grad_sum[g] = grad_sum[g] + b * grad
      hess_sum[g] = hess_sum[g] + b * hess
    return {'groups': state['groups'], 'grad': grad_sum, 'hess': hess_sum,
            'count': state['count'] + b}

  def finalize(self, state, model, variables):
    n = state['count']
    return _as_numpy({g: jnp.abs(-state['grad'][g] / n + 0.5 * state['hess'][g] / n)
                      for g, _ in _groups(state)})


CRITERIA: dict[str, Criterion] = {
    'random': Random(),
    'l1': WeightNorm('l1'),
    'l2': WeightNorm('l2'),
    'min_weight': WeightNorm('min_weight'),
    'bn_scale': BnScale(),
    'mean_activation': Activation('mean_activation'),
    'activation_std': Activation('activation_std'),
    'apoz': Activation('apoz'),
    'taylor': GateGradient('taylor'),
    'taylor_signed_mean': GateGradient('taylor_signed_mean'),
    'taylor_abs_elementwise': GateGradient('taylor_abs_elementwise'),
    'taylor_fo': GateGradient('taylor_fo'),
    'fisher': GateGradient('fisher'),
    'second_order': SecondOrder(),
    'oracle': Oracle(),
}


def get(name: str, **options) -> Criterion:
  """The registered criterion `name`, with dataclass fields (e.g. chunk_size) replaced; an
  unknown `name` or a chunk_size that is not a positive integer is a ConfigError (a user's
  setting), an option the criterion lacks a ValueError (the caller's bug)."""
  choose('criterion', name, CRITERIA, setting='criterion')
  criterion = CRITERIA[name]
  if not options:
    return criterion
  allowed = [f.name for f in dataclasses.fields(criterion) if f.name != 'name']
  bad = [k for k in options if k not in allowed]
  if bad:
    raise ValueError(f"criterion {name!r} has no options {bad}; its options are "
                     f"{allowed or 'none'}.")
  size = options.get('chunk_size')
  if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer))
                           or size < 1):
    raise ConfigError(f"chunk_size must be a positive integer, got {size!r}.",
                      settings=('chunk_size',))
  return dataclasses.replace(criterion, **options)


def _accumulate(criterion, model, state, variables, masks, batch):
  return criterion.accumulate(state, model, variables, masks, batch)


@functools.cache
def _jit_accumulate(xla_options: str) -> Callable:
  # Jitted on first use, not at import: the compiler options depend on the backend.
  return compiler.jit(_accumulate, xla_options=xla_options, static_argnums=(0, 1))


def accumulator(criterion: Criterion, model: Program) -> Callable:
  """`criterion.accumulate` jitted for `model`: (state, variables, masks, batch) -> state.
  Compiled once per criterion, program (by identity: `program.derive` returns one per model
  and image shape) and input shapes; masks are inputs (pass the same groups every time, e.g.
  all), so new masks do not recompile."""
  return functools.partial(_jit_accumulate(model.xla_options), criterion, model)


def score(name: str, model: Program, variables, batches: Iterable[Mapping] | None,
          masks: Mapping | None = None, rng=None, **options) -> Scores:
  """{group: (C,) numpy scores} for every prunable group; higher = more important.

  Args:
    name: a key of CRITERIA.
    model: the model's program (`program.derive`), whose structure the scores follow.
    variables: the model's variables (params, batch_stats, indices).
    batches: {'image', 'label'} batches, read once; not iterated by data-free criteria.
    masks: {group: (C,)} current masks (0 = removed); missing groups are unmasked.
    rng: a PRNG key or int seed, used by `random`.
    **options: criterion fields, e.g. chunk_size=32 for `oracle`.
  """
  criterion = get(name, **options)
  state = criterion.init(model.structure, rng)
  if not criterion.needs_data:
    return criterion.finalize(state, model, variables)
  batches = iter(batches if batches is not None else ())
  first = next(batches, None)
  if first is None:
    raise ValueError(f"criterion {name!r} needs at least one batch of data, got none.")
  full = _full_masks(model.structure, masks)
  step = accumulator(criterion, model)
  for batch in itertools.chain([first], batches):
    state = step(state, variables, full, batch)
  return criterion.finalize(state, model, variables)
