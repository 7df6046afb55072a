r"""Cost of each importance criterion per batch against one train step, and of the vmapped
oracle against one jitted forward pass per removed channel (bench README, section 9).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import common
from jaxprune import models, train
from jaxprune.errors import ConfigError
from jaxprune.kernels import compiler
from jaxprune.prune import criteria, program

FLAGS = flags.FLAGS
flags.DEFINE_string('model', 'resnet20', 'Model for (a).')
flags.DEFINE_integer('image_size', 32, 'Image side for (a).', lower_bound=8)
flags.DEFINE_integer('batch', 64, 'Batch size for (a).', lower_bound=1)
flags.DEFINE_list('criteria', list(criteria.CRITERIA), 'Criteria to time in (a).')
flags.DEFINE_integer('reps', 7, 'Timed repetitions (the best is reported).', lower_bound=1)
flags.DEFINE_list('oracle_models', ['resnet20', 'vgg11'],
                  'Models for (b); each needs >= 256 prunable channels.')
flags.DEFINE_integer('oracle_image_size', 16, 'Image side for (b).', lower_bound=8)
flags.DEFINE_integer('oracle_batch', 8, 'Batch size for (b).', lower_bound=1)
flags.DEFINE_integer('chunk_size', None, 'Cap on removals vmapped at once (default: the '
                     'memory bound alone).', lower_bound=1)
flags.DEFINE_integer('loop_channels', 0, 'Channels per group the loop times (0: all).',
                     lower_bound=0)
flags.DEFINE_integer('unshared_max_channels', 512, 'Time the oracle without prefix sharing '
                     'only up to this many channels.', lower_bound=0)
flags.DEFINE_string('out', None, 'Write the tables as JSON here.')

GRADIENT = ('taylor', 'taylor_signed_mean', 'taylor_abs_elementwise', 'taylor_fo', 'fisher')
ACTIVATION = ('mean_activation', 'activation_std', 'apoz')
TARGETS = {**{n: 0.8 for n in GRADIENT}, **{n: 0.5 for n in ACTIVATION}}


def _setup(name, image_size, batch_size, seed=0):
  """(model, variables, batch, program, all-ones masks)."""
  model, shape = models.build(name), (image_size, image_size, 3)
  variables = models.init(model, jax.random.key(seed), shape)
  prog = program.derive(model, shape)
  masks = {g: jnp.ones((prog.structure.widths[g],), jnp.float32) for g in prog.structure.prunable}
  return model, variables, common.random_batch(batch_size, shape, seed), prog, masks


def criterion_costs():
  model, variables, batch, prog, masks = _setup(FLAGS.model, FLAGS.image_size, FLAGS.batch)
  step = common.stepper(train.Trainer(model, train.make_optimizer(train.OptimizerConfig())),
                        variables, batch)
  compile_step, times, _ = common.step_times(step, 0, FLAGS.reps)
  train_s = min(times)
  rows = [{'criterion': 'train_step', 'kind': 'reference', 'compile_s': compile_step - train_s,
           'seconds': train_s, 'ratio': 1.0}]
  for name in FLAGS.criteria:
    criterion = criteria.get(name)
    try:
      state = criterion.init(prog.structure, jax.random.key(0))
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
    first = common.timed(run)[0]
    # Alternating with the step keeps the ratio honest while the load drifts; the best of each,
    # as noise on a shared machine only adds time.
    pairs = [(common.timed(step)[0], common.timed(run)[0])
             for _ in range(1 if name in ('oracle', 'second_order') else FLAGS.reps)]
    step_s, seconds = min(p[0] for p in pairs), min(p[1] for p in pairs)
    ratio = seconds / step_s
    row = {'criterion': name, 'kind': kind, 'compile_s': max(0.0, first - seconds),
           'seconds': seconds, 'train_step_s': step_s, 'ratio': ratio}
    if name in TARGETS:
      row.update(target=TARGETS[name], meets_target=bool(ratio <= TARGETS[name]))
    rows.append(row)
  return {'model': FLAGS.model, 'image_size': FLAGS.image_size, 'batch': FLAGS.batch,
          'device': str(jax.devices()[0]), 'rows': rows}


def prefix_sharing_bound(st) -> float:
  """Loop MACs over vmapped-oracle MACs: per channel the loop runs every kernel, the oracle those
  from the first that reads the channel's group on (structure.positions is in call order)."""
  kernels = list(st.positions)
  macs = [st.positions[k] * math.prod(st.shapes[k]) for k in kernels]
  total = sum(macs)
  suffix = 0
  for g in st.prunable:
    first = next(i for i, k in enumerate(kernels) if st.axes[k][-2] == g)
    suffix += st.widths[g] * sum(macs[first:])
  return sum(st.widths[g] for g in st.prunable) * total / suffix


def oracle_speedup(name):
  model, variables, batch, prog, masks = _setup(name, FLAGS.oracle_image_size,
                                                FLAGS.oracle_batch, seed=1)
  st = prog.structure
  channels = sum(st.widths[g] for g in st.prunable)
  sample = {g: np.linspace(0, st.widths[g] - 1, min(FLAGS.loop_channels or st.widths[g],
                                                     st.widths[g])).round().astype(int)
            for g in st.prunable}

  mean_loss = compiler.jit(
      lambda masks: train.cross_entropy(prog.apply(variables, batch['image'], masks=masks),
                                        batch['label']).mean(),
      xla_options=model.performance.xla_options)

  def loop():
    base = mean_loss(masks)
    return {g: jnp.stack([jnp.abs(mean_loss({**masks, g: masks[g].at[k].set(0.0)}) - base)
                          for k in ks]) for g, ks in sample.items()}

  compile_loop = common.timed(mean_loss, masks)[0]
  looped = jax.block_until_ready(loop())
  calls = sum(len(ks) for ks in sample.values())
  loop_s = min(common.timed(loop)[0] for _ in range(2)) * channels / calls
  methods = [{'method': 'loop, one channel per call', 'compile_s': compile_loop,
              'seconds': loop_s, 'speedup': 1.0}]
  for share in (True, False):
    if not share and channels > FLAGS.unshared_max_channels:
      continue
    criterion = criteria.get('oracle', chunk_size=FLAGS.chunk_size, share_prefix=share)
    accumulate = criteria.accumulator(criterion, prog)
    state = criterion.init(st)
    first, times, _ = common.step_times(lambda: accumulate(state, variables, masks, batch), 0, 2)
    scores = criterion.finalize(accumulate(state, variables, masks, batch), prog, variables)
    methods.append({
        'method': 'vmap, prefix shared (default)' if share else 'vmap, full forward per removal',
        'compile_s': max(0.0, first - min(times)), 'seconds': min(times),
        'speedup': loop_s / min(times),
        'max_abs_diff_vs_loop': max(float(np.max(np.abs(scores[g][ks] - np.asarray(looped[g]))))
                                    for g, ks in sample.items())})
  return {'model': name, 'image_size': FLAGS.oracle_image_size, 'batch': FLAGS.oracle_batch,
          'channels': channels, 'loop_calls_timed': calls, 'chunk_size': FLAGS.chunk_size,
          'prefix_sharing_macs_bound': prefix_sharing_bound(st), 'methods': methods,
          'meets_target': bool(methods[1]['speedup'] >= 5)}


def main():
  # Unknown names stop here, in one sentence, before anything is timed.
  unknown = [name for name in FLAGS.criteria if name not in criteria.CRITERIA]
  if unknown:
    raise app.UsageError(f"--criteria {unknown} are not criteria; choose from "
                         f"{', '.join(criteria.CRITERIA)}.")
  for name in [FLAGS.model] + FLAGS.oracle_models:
    models.build(name)
  costs = criterion_costs()
  oracles = [oracle_speedup(name) for name in FLAGS.oracle_models]
  print(f"(a) {costs['model']} {costs['image_size']}x{costs['image_size']}, batch "
        f"{costs['batch']}, {costs['device']}; time per batch relative to one train step")
  print(common.format_table(
      [{**r, 'ms': 1e3 * r['seconds']} if 'seconds' in r else r for r in costs['rows']],
      ['criterion', 'kind', 'compile_s', 'ms', 'ratio', 'target', 'meets_target', 'error']))
  for oracle in oracles:
    print(f"\n(b) oracle on {oracle['model']} {oracle['image_size']}x{oracle['image_size']}, "
          f"batch {oracle['batch']}, {oracle['channels']} prunable channels, chunk cap "
          f"{oracle['chunk_size']}; loop timed on {oracle['loop_calls_timed']} calls, scaled")
    print(common.format_table(oracle['methods'], ['method', 'compile_s', 'seconds', 'speedup',
                                                  'max_abs_diff_vs_loop']))
    print(f"target >= 5x: {'ok' if oracle['meets_target'] else 'MISSED'}; loop MACs / vmapped "
          f"MACs (the arithmetic bound of prefix sharing): "
          f"{oracle['prefix_sharing_macs_bound']:.1f}x")
  common.write_json(FLAGS.out, criteria=costs, oracle=oracles)


if __name__ == '__main__':
  common.run(main)
