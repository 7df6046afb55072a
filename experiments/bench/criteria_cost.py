r"""Cost of each importance criterion, and of the vmapped oracle against a loop.

    python experiments/bench/criteria_cost.py --out=/tmp/criteria_cost.json

(a) On one batch: the steady-state time of every criterion's `accumulate`
    (data criteria) or `finalize` (data-free ones) relative to one training step
    on the same batch and model (jaxprune's own step, `train.Trainer(...).train_step`:
    train-mode forward, backward, SGD momentum with weight decay), the two timed
    alternately, best of --reps each. Compile time is excluded and reported apart;
    `oracle` and `second_order` are timed --expensive_reps times.
    The project's targets: gradient criteria <= 0.8x a step, activation
    criteria <= 0.5x.
(b) The oracle on models with >= 256 prunable channels: the vmapped criterion
    against removing one channel at a time with a jitted full forward pass
    (masks are inputs, so the loop compiles once; compiled with `jaxprune.kernels.compiler`'s
    options, as the criteria are). Every loop call is the same
    full forward, so with --loop_channels the loop is timed on that many
    channels per group and scaled to all of them (its scores are compared on
    those channels). Where the model has at most --unshared_max_channels, the
    vmapped oracle without prefix sharing (one full forward per removal) is
    timed too. Target: >= 5x faster than the loop.
"""

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

import common  # noqa: E402
from jaxprune import models, train  # noqa: E402
from jaxprune.kernels import compiler
from jaxprune.prune import criteria, program
from jaxprune.errors import ConfigError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('model', 'resnet20', 'Model for (a).')
flags.DEFINE_integer('image_size', 32, 'Image side for (a).', lower_bound=8)
flags.DEFINE_integer('batch', 64, 'Batch size for (a).', lower_bound=1)
flags.DEFINE_list('criteria', list(criteria.CRITERIA), 'Criteria to time in (a).')
flags.DEFINE_integer('reps', 7, 'Timed repetitions (the best is reported).', lower_bound=1)
flags.DEFINE_integer('expensive_reps', 1, 'Timed repetitions for oracle and second_order in (a).',
                     lower_bound=1)
flags.DEFINE_list('oracle_models', ['resnet20', 'vgg11'],
                  'Models for (b); each needs >= 256 prunable channels.')
flags.DEFINE_integer('oracle_image_size', 16, 'Image side for (b).', lower_bound=8)
flags.DEFINE_integer('oracle_batch', 8, 'Batch size for (b).', lower_bound=1)
flags.DEFINE_integer('chunk_size', None,
                     'Cap on removals vmapped at once (default: the memory bound alone).',
                     lower_bound=1)
flags.DEFINE_integer('loop_channels', 0, 'Channels per group the loop times (0: all).',
                     lower_bound=0)
flags.DEFINE_integer('unshared_max_channels', 512,
                     'Time the oracle without prefix sharing only up to this many channels.',
                     lower_bound=0)
flags.DEFINE_string('out', None, 'Write the tables as JSON here.')

GRADIENT = ('taylor', 'taylor_signed_mean', 'taylor_abs_elementwise', 'taylor_fo', 'fisher')
ACTIVATION = ('mean_activation', 'activation_std', 'apoz')
TARGETS = {**{n: 0.8 for n in GRADIENT}, **{n: 0.5 for n in ACTIVATION}}


def _setup(name, image_size, batch_size, seed=0):
  model = models.build(name)
  shape = (image_size, image_size, 3)
  rng = np.random.default_rng(seed)
  batch = {'image': jnp.asarray(rng.normal(size=(batch_size,) + shape), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
  variables = jax.jit(model.init)(jax.random.key(seed), batch['image'][:1])
  return model, variables, batch, program.derive(model, shape)


def _once(fn):
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _timed(fn, reps):
  """(first call seconds, best steady-state seconds) of fn(), blocking on its result.

  The best of several runs, not the mean: on a shared machine the noise only ever
  adds time.
  """
  first = _once(fn)
  return first, min(_once(fn) for _ in range(reps))


def _paired(reference, fn, reps):
  """(first call of fn, best of fn, best of reference), the two timed alternately.

  Alternating keeps the ratio honest on a machine whose load drifts.
  """
  first = _once(fn)
  pairs = [(_once(reference), _once(fn)) for _ in range(reps)]
  return first, min(p[1] for p in pairs), min(p[0] for p in pairs)


def _train_step(model, variables, batch):
  """One call of jaxprune's train step per call of the returned function.

  The step donates its state, so each call trains on from the previous one; the time of a
  step does not depend on the values.
  """
  trainer = train.Trainer(model, train.make_optimizer(train.OptimizerConfig()))
  holder = {'state': trainer.init_state(variables, seed=0)}
  batch = trainer.shard_batch(batch)
  learning_rate = np.float32(0.1)

  def step():
    holder['state'], metrics = trainer.train_step(holder['state'], batch, None, learning_rate)
    return holder['state'], metrics

  return step


def criterion_costs():
  model, variables, batch, prog = _setup(FLAGS.model, FLAGS.image_size, FLAGS.batch)
  st = prog.structure
  step = _train_step(model, variables, batch)
  compile_step, train_s = _timed(step, FLAGS.reps)
  rows = [{'criterion': 'train_step', 'kind': 'reference', 'compile_s': compile_step - train_s,
           'seconds': train_s, 'ratio': 1.0}]
  masks = {g: jnp.ones((st.widths[g],), jnp.float32) for g in st.prunable}
  for name in FLAGS.criteria:
    criterion = criteria.get(name)
    try:
      state = criterion.init(st, jax.random.key(0))
    except ConfigError as e:
      rows.append({'criterion': name, 'kind': 'n/a', 'error': str(e)})
      continue
    if criterion.needs_data:
      accumulate = criteria.accumulator(criterion, prog)
      run = lambda: accumulate(state, variables, masks, batch)
      kind = 'data'
    else:
      run = lambda: criterion.finalize(state, prog, variables)
      kind = 'data-free'
    reps = FLAGS.expensive_reps if name in ('oracle', 'second_order') else FLAGS.reps
    first, seconds, step_s = _paired(step, run, reps)
    ratio = seconds / step_s
    row = {'criterion': name, 'kind': kind, 'compile_s': max(0.0, first - seconds),
           'seconds': seconds, 'train_step_s': step_s, 'ratio': ratio}
    if name in TARGETS:
      row.update(target=TARGETS[name], meets_target=bool(ratio <= TARGETS[name]))
    rows.append(row)
  return {'model': FLAGS.model, 'image_size': FLAGS.image_size, 'batch': FLAGS.batch,
          'device': str(jax.devices()[0]), 'rows': rows}


def prefix_sharing_bound(st) -> float:
  """Loop MACs over vmapped-oracle MACs: the speedup prefix sharing alone can give.

  The loop runs every kernel for every channel; the vmapped oracle runs, per
  channel, only the kernels from the first one that reads the channel's group
  (structure.positions is in call order).
  """
  kernels = list(st.positions)
  macs = [st.positions[k] * math.prod(st.shapes[k]) for k in kernels]
  total = sum(macs)
  suffix = 0
  for g in st.prunable:
    first = next(i for i, k in enumerate(kernels) if st.axes[k][-2] == g)
    suffix += st.widths[g] * sum(macs[first:])
  return sum(st.widths[g] for g in st.prunable) * total / suffix


def oracle_speedup(name):
  model, variables, batch, prog = _setup(name, FLAGS.oracle_image_size, FLAGS.oracle_batch,
                                         seed=1)
  st = prog.structure
  channels = sum(st.widths[g] for g in st.prunable)
  masks = {g: jnp.ones((st.widths[g],), jnp.float32) for g in st.prunable}
  sample = {g: np.linspace(0, st.widths[g] - 1, min(FLAGS.loop_channels or st.widths[g],
                                                     st.widths[g])).round().astype(int)
            for g in st.prunable}

  def mean_loss(masks):
    logits = prog.apply(variables, batch['image'], masks=masks)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

  mean_loss = compiler.jit(mean_loss, xla_options=model.performance.xla_options)

  def loop():
    base = mean_loss(masks)
    return {g: jnp.stack([jnp.abs(mean_loss({**masks, g: masks[g].at[k].set(0.0)}) - base)
                          for k in ks]) for g, ks in sample.items()}

  compile_loop = _once(lambda: mean_loss(masks))
  looped = jax.block_until_ready(loop())
  calls = sum(len(ks) for ks in sample.values())
  loop_s = min(_once(loop) for _ in range(2)) * channels / calls
  result = {'model': name, 'image_size': FLAGS.oracle_image_size, 'batch': FLAGS.oracle_batch,
            'channels': channels, 'loop_calls_timed': calls, 'loop_s': loop_s,
            'loop_compile_s': compile_loop, 'chunk_size': FLAGS.chunk_size,
            'prefix_sharing_macs_bound': prefix_sharing_bound(st)}
  for share in (True, False):
    if not share and channels > FLAGS.unshared_max_channels:
      continue
    criterion = criteria.get('oracle', chunk_size=FLAGS.chunk_size, share_prefix=share)
    accumulate = criteria.accumulator(criterion, prog)
    state = criterion.init(st)
    first, seconds = _timed(lambda: accumulate(state, variables, masks, batch), 2)
    scores = criterion.finalize(accumulate(state, variables, masks, batch), prog, variables)
    error = max(float(np.max(np.abs(scores[g][ks] - np.asarray(looped[g]))))
                for g, ks in sample.items())
    key = 'vmap_shared_prefix' if share else 'vmap_full_forward'
    result[key] = {'seconds': seconds, 'compile_s': max(0.0, first - seconds),
                   'speedup': loop_s / seconds, 'max_abs_diff_vs_loop': error}
  result['meets_target'] = bool(result['vmap_shared_prefix']['speedup'] >= 5)
  return result


def _print(costs, oracles):
  print(f"(a) {costs['model']} {costs['image_size']}x{costs['image_size']}, "
        f"batch {costs['batch']}, {costs['device']}; time per batch relative to one train step")
  print(f"{'criterion':24s} {'kind':10s} {'compile s':>10s} {'ms':>10s} {'x step':>8s}  target")
  for r in costs['rows']:
    if 'error' in r:
      print(f"{r['criterion']:24s} {'n/a':10s} {r['error']}")
      continue
    target = ''
    if 'target' in r:
      target = f"<= {r['target']} {'ok' if r['meets_target'] else 'MISSED'}"
    print(f"{r['criterion']:24s} {r['kind']:10s} {r['compile_s']:10.2f} {1e3 * r['seconds']:10.2f} "
          f"{r['ratio']:8.3f}  {target}")
  for oracle in oracles:
    print()
    print(f"(b) oracle on {oracle['model']} {oracle['image_size']}x{oracle['image_size']}, batch "
          f"{oracle['batch']}, {oracle['channels']} prunable channels, chunk cap "
          f"{oracle['chunk_size']}; loop timed on {oracle['loop_calls_timed']} calls, scaled")
    print(f"{'method':34s} {'compile s':>10s} {'s':>9s} {'speedup':>8s} {'max |diff|':>11s}")
    print(f"{'loop, one channel per call':34s} {oracle['loop_compile_s']:10.2f} "
          f"{oracle['loop_s']:9.3f} {1.0:8.1f}")
    for key, label in (('vmap_shared_prefix', 'vmap, prefix shared (default)'),
                       ('vmap_full_forward', 'vmap, full forward per removal')):
      if key in oracle:
        r = oracle[key]
        print(f"{label:34s} {r['compile_s']:10.2f} {r['seconds']:9.3f} {r['speedup']:8.1f} "
              f"{r['max_abs_diff_vs_loop']:11.2e}")
    print(f"target >= 5x: {'ok' if oracle['meets_target'] else 'MISSED'}; loop MACs / vmapped "
          f"MACs (the arithmetic bound of prefix sharing): "
          f"{oracle['prefix_sharing_macs_bound']:.1f}x")


def main(argv):
  del argv
  # Unknown names stop here, in one sentence, before anything is timed.
  unknown = [name for name in FLAGS.criteria if name not in criteria.CRITERIA]
  if unknown:
    raise app.UsageError(f"--criteria {unknown} are not criteria; choose from "
                         f"{', '.join(criteria.CRITERIA)}.")
  for name in [FLAGS.model] + FLAGS.oracle_models:
    models.build(name)
  costs = criterion_costs()
  oracles = [oracle_speedup(name) for name in FLAGS.oracle_models]
  _print(costs, oracles)
  common.write_json(FLAGS.out, {'machine': common.machine(), 'criteria': costs,
                                'oracle': oracles})


if __name__ == '__main__':
  common.run(main)
