r"""How often a pipeline run compiles, and for how long: one-shot and iterative pruning.

    python experiments/bench/compiles.py --out=compiles.json

Runs the pipeline twice, each in a fresh process and temporary work directory (digits,
small epochs), stage by stage through its public stage functions (`pipeline.load_data`,
`baseline`, `prune`, `retrain`):
  oneshot    baseline -> l1 scores, global selection -> shrink -> every regime (--regime)
  iterative  baseline -> fine-tuning with a Taylor accumulator and a global removal every
             --prune_every steps (the masks change many times) -> shrink -> fine-tune
and counts every XLA backend compilation (jax.monitoring's
'/jax/core/compile/backend_compile_duration' events, with the jitted function's name)
per stage.

What should hold: the train step (`sharded_train_step`) compiles once per distinct width
configuration (with or without masks) a run trains, whatever the learning-rate schedule
or length of each stage (the learning rate is a step input), and changing mask values
(the iterative prune stage, `removal_rounds` of them: channels removed / --prune_step)
never recompiles it.
"""

import collections
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import flags, logging  # noqa: E402

import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('model', 'resnet20', 'Model (digits are 8x8; every CIFAR ResNet fits).')
flags.DEFINE_integer('epochs', 2, 'Baseline epochs.', lower_bound=1)
flags.DEFINE_integer('finetune_epochs', 1, 'Fine-tuning epochs.', lower_bound=1)
flags.DEFINE_integer('batch_size', 128, 'Batch size.', lower_bound=1)
flags.DEFINE_integer('max_train', 1024, 'Training images used (of 1437).', lower_bound=1)
flags.DEFINE_string('regime', 'all',
                    "One-shot run's regime (pipeline's --regime; 'all' = every one).")
flags.DEFINE_integer('prune_every', 2, 'Iterative: steps between removals.', lower_bound=1)
flags.DEFINE_integer('prune_step', 4, 'Iterative: channels removed per removal.', lower_bound=1)
flags.DEFINE_float('prune_ratio', 0.3, 'Fraction of the prunable channels removed.')
flags.DEFINE_string('out', None, 'Write the table as JSON here.')
flags.DEFINE_string('run', None, 'Internal: run only this one (oneshot or iterative).')

STEP = 'sharded_train_step'  # jax.monitoring names it 'jit(sharded_train_step)'


def _is_step(fun_name: str) -> bool:
  return STEP in fun_name


def run_pipeline(name, settings, workdir, log):
  """Runs one pipeline stage by stage; returns per-stage rows, wall seconds and compiles by
  function."""
  from jaxprune import pipeline

  config = pipeline.make(workdir=workdir, model=FLAGS.model, dataset='digits',
                         max_train=FLAGS.max_train, epochs=FLAGS.epochs,
                         batch_size=FLAGS.batch_size, finetune_epochs=FLAGS.finetune_epochs,
                         regime=FLAGS.regime, **settings)
  pipeline.validate(config)
  segments = []

  def stage(label, fn, *args):
    first = len(log.events)
    out = fn(*args)
    segments.append((label, log.events[first:]))
    return out

  start = time.perf_counter()
  data = stage('load_data', pipeline.load_data, config)
  base = stage('baseline', pipeline.baseline, config, data)
  outcome = stage('prune', pipeline.prune, config, base, data)
  for regime in pipeline.regimes_of(config):
    stage(regime, pipeline.retrain, config, regime, outcome.pruned, data)
  wall = time.perf_counter() - start

  record = outcome.record
  removed = sum(record['widths_before'][g] - record['widths'][g] for g in record['masks'])
  rounds = -(-removed // FLAGS.prune_step) if settings['schedule'] == 'iterative' else 0
  rows = []
  for label, events in segments:
    step = [d for n, d in events if _is_step(n)]
    rows.append({'run': name, 'stage': label, 'compiles': len(events),
                 'compile_s': sum(d for _, d in events), 'train_step_compiles': len(step),
                 'train_step_compile_s': sum(step),
                 'removal_rounds': rounds if label == 'prune' else 0})
  by_name = collections.Counter(n for n, _ in log.events)
  return rows, wall, dict(by_name)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax

  runs = {
      'oneshot': dict(criterion='l1', selection='global', prune_ratio=FLAGS.prune_ratio,
                      schedule='oneshot'),
      'iterative': dict(criterion='taylor', selection='global', prune_ratio=FLAGS.prune_ratio,
                        schedule='iterative', prune_every=FLAGS.prune_every,
                        prune_step=FLAGS.prune_step),
  }
  rows, summary = [], []
  for name, kwargs in runs.items():
    if FLAGS.run and name != FLAGS.run:
      continue
    if not FLAGS.run:
      # Each run in a fresh process, so that neither reuses the other's compiled steps.
      args = [a for a in sys.argv[1:] if not a.startswith('--out')] + [f'--run={name}']
      result = common.run_worker(os.path.abspath(__file__), args, timeout=7200)
      rows += result['rows']
      summary.append(result['summary'])
      continue
    if name == 'iterative':
      FLAGS.regime = 'finetune'
    with tempfile.TemporaryDirectory() as workdir, common.CompileLog() as log:
      run_rows, wall, by_name = run_pipeline(name, kwargs, workdir, log)
    step_compiles = sum(1 for n, _ in log.events if _is_step(n))
    print(json.dumps({'rows': run_rows, 'summary': {
        'run': name, 'wall_s': wall, 'compiles': len(log.events), 'compile_s': log.seconds(),
        'train_step_compiles': step_compiles, 'by_function': by_name}}))
    return
  columns = ['run', 'stage', 'compiles', 'compile_s', 'train_step_compiles',
             'train_step_compile_s', 'removal_rounds']
  print()
  print(f'{FLAGS.model} on digits, batch {FLAGS.batch_size}, backend {jax.default_backend()}; '
        'compiles = XLA backend compilations during the stage')
  print(common.format_table(rows, columns))
  print()
  print(common.format_table(summary, ['run', 'wall_s', 'compiles', 'compile_s',
                                      'train_step_compiles']))
  for s in summary:
    print(f"{s['run']}: compiles by function: "
          + ', '.join(f'{k} x{v}' for k, v in sorted(s['by_function'].items(),
                                                       key=lambda kv: -kv[1])))
  common.write_json(FLAGS.out, {'machine': common.machine(), 'model': FLAGS.model,
                                'rows': rows, 'summary': summary})


if __name__ == '__main__':
  common.run(main)
