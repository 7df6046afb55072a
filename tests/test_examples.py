"""The examples/ models (no jaxprune inside) pruned through `jaxprune.Pruner`: removal by
shrinking equals masking, costs equal the shrunk program's own, gate gradients equal a
per-example brute force, and prune -> shrink -> fine-tune runs."""

import functools
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from conftest import ROOT
from jaxprune import Pruner
from jaxprune.kernels import compiler
from jaxprune.prune import criteria
from random_variables import random_like

EXAMPLES = ('mobilenet_v2', 'resnext', 'densenet_concat')
IMAGES = (4, 16, 16, 3)


def _example(name):
  spec = importlib.util.spec_from_file_location(f'examples_{name}', ROOT / 'examples' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _batch(seed=0, shape=IMAGES):
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=shape).astype(np.float32),
          'label': rng.integers(0, 10, size=shape[0]).astype(np.int32)}


@functools.cache
def _pruner(name) -> Pruner:
  x = _batch()['image']
  if name == 'mobilenet_v2':
    abstract = nnx.eval_shape(lambda: _example(name).MobileNetV2(rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    values = traverse_util.flatten_dict(random_like(
        traverse_util.unflatten_dict({path: v.get_value() for path, v in flat})))
    model = nnx.merge(graphdef, nnx.from_flat_state(
        [(path, v.replace(value=jnp.asarray(values[path]))) for path, v in flat]))
    return Pruner(model, None, x)
  model = _example(name).ResNeXt() if name == 'resnext' else _example(name).DenseNet()
  variables = random_like(jax.eval_shape(model.init, jax.random.key(0), x))
  return Pruner(functools.partial(model.apply, train=False), variables, x)


def _random_masks(pruner, density, seed, single=None):
  rng = np.random.default_rng(seed)
  masks = {}
  for g, width in pruner.structure.widths.items():
    m = (rng.random(width) < density).astype(np.float32)
    m[rng.integers(width)] = 1
    if g == single:
      m[:] = 0
      m[rng.integers(width)] = 1
    masks[g] = m
  return masks


def _program_cost(fn, *args):
  """(MACs per example, params) counted from the shapes of a program's convs and matmuls."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  batch = IMAGES[0]
  macs = 0

  def walk(j):
    nonlocal macs
    for eqn in j.eqns:
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          if hasattr(sub, 'eqns') or hasattr(sub, 'jaxpr'):
            walk(sub.jaxpr if hasattr(sub, 'jaxpr') else sub)
      out = eqn.outvars[0].aval.shape if eqn.outvars else ()
      if eqn.primitive.name == 'conv_general_dilated':
        rhs = eqn.invars[1].aval.shape
        rhs_spec = eqn.params['dimension_numbers'].rhs_spec
        window = math.prod(rhs[d] for d in rhs_spec[2:])
        macs += math.prod(out) // batch * window * rhs[rhs_spec[1]]
      elif eqn.primitive.name == 'dot_general':
        lhs = eqn.invars[0].aval.shape
        (lc, _), _ = eqn.params['dimension_numbers']
        macs += math.prod(out) // batch * math.prod(lhs[d] for d in lc)

  walk(jaxpr.jaxpr)
  return macs


@pytest.mark.parametrize('name', EXAMPLES)
def test_shrunk_model_matches_masked_model(name):
  pruner = _pruner(name)
  x = _batch(1)['image']
  smallest = min(pruner.structure.widths, key=pruner.structure.widths.get)
  cases = [(0.25, None), (0.9, None), (0.5, smallest)]
  # Programs run once each here: compiled at a low optimisation level, which is quicker.
  masked_apply = compiler.jit_once(pruner.apply)
  for seed, (density, single) in enumerate(cases):
    masks = _random_masks(pruner, density, seed, single)
    masked = np.asarray(masked_apply(pruner.variables, x, masks))
    small = pruner.shrink(masks)
    outputs = [compiler.jit_once(small.apply)(small.variables, x)]
    if small.module is not None:
      small.module.eval()
    if small.module is not None and seed % 2:
      graphdef, state = nnx.split(small.module)
      outputs.append(compiler.jit_once(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
    for out in outputs:
      np.testing.assert_allclose(out, masked, rtol=1e-5, atol=1e-5 * np.abs(masked).max())
    params = sum(np.size(v) for v in jax.tree.leaves(small.variables['params']))
    assert small.cost.params == params
    if small.module is not None:
      graphdef, state = nnx.split(small.module)
      macs = _program_cost(lambda x: nnx.merge(graphdef, state)(x), x)
    else:
      macs = _program_cost(small.apply, small.variables, x)
    assert small.cost.macs == macs
    if single is not None:
      assert small.widths[single] == 1


# Each example costs a few seconds of compiling; by default the depthwise and grouped
# convolutions are checked, and every example under `-m slow`.
_DEFAULT = ('mobilenet_v2', 'resnext')


@pytest.mark.parametrize('name', [n if n in _DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in EXAMPLES])
def test_gate_gradients_match_per_example_brute_force(name):
  pruner = _pruner(name)
  batch = _batch(2)
  masks = {g: jnp.asarray(m) for g, m in _random_masks(pruner, 0.7, 5).items()}
  gates, _ = compiler.jit_once(functools.partial(criteria.gate_gradients, pruner.program))(
      pruner.variables, masks, batch)

  def example_loss(gate, n):
    logits = pruner.apply(pruner.variables, batch['image'][n:n + 1],
                          {g: gate[g] * masks[g] for g in masks})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'][n:n + 1])[0]

  ones = {g: jnp.ones_like(m) for g, m in masks.items()}
  example_gradient = compiler.jit_once(jax.grad(example_loss), static_argnums=1)
  for n in range(IMAGES[0]):
    brute = example_gradient(ones, n)
    for g in masks:
      scale = float(np.abs(gates[g]).max()) or 1.0
      np.testing.assert_allclose(gates[g][n], brute[g], rtol=1e-4, atol=1e-5 * scale)


def _loss_linen(apply, params, rest, batch):
  logits = apply({'params': params, **rest}, batch['image'])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()


@pytest.mark.parametrize('name', [n if n == 'mobilenet_v2' else pytest.param(n, marks=pytest.mark.slow)
                                  for n in EXAMPLES])
def test_prune_shrink_and_finetune(name):
  pruner = _pruner(name)
  batches = [_batch(10 + i) for i in range(2)]
  scores = pruner.score('taylor', batches)
  masks = pruner.select('global', scores, ratio=0.5)
  small = pruner.shrink(masks)
  assert small.cost.macs < pruner.cost().macs
  batch = _batch(20, (8,) + IMAGES[1:])
  tx = optax.sgd(0.05)
  if small.module is not None:
    model = small.module
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
      def loss_fn(model):
        logits = model(batch['image'])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)
      return loss

    losses = [float(step(model, optimizer, batch)) for _ in range(4)]
  else:
    params = small.variables['params']
    rest = {k: v for k, v in small.variables.items() if k != 'params'}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
      loss, grads = jax.value_and_grad(functools.partial(_loss_linen, small.apply))(
          params, rest, batch)
      updates, state = tx.update(grads, state)
      return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(4):
      params, state, loss = step(params, state)
      losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_virtual_leaves_cover_the_real_ones():
  """A concatenation's reader appears as one piece per group, and the pieces tile the leaf."""
  pruner = _pruner('densenet_concat')
  flat = traverse_util.flatten_dict(pruner.variables)
  pieces = pruner.graph.virtual_leaves(flat)
  for key, value in flat.items():
    parts = [v for k, v in pieces.items() if k[:-2] == key[:-1] and k[-1] == key[-1]
             and len(k) == len(key) + 1] or [pieces[key]]
    assert sum(np.size(p) for p in parts) == np.size(value)
