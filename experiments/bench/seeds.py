r"""What `--seeds=N` saves: one launch.py process training N seeds against N separate runs.

    python experiments/bench/seeds.py --data_path=NPZ --out=seeds.json

Runs the same small job (baseline -> --criterion scores -> --selection -> one --regime) on
the CIFAR-10 sample npz, as users run it, each command a fresh `python launch.py` process
in a temporary work directory:
  separate   --seeds times `launch.py --seed=i` (i = 0 .. seeds - 1), one after another;
  loop       one `launch.py --seeds=N --seed_batching=loop` (`pipeline.run_seeds`: the
             copies share one process, its compiled steps and its loaded dataset);
  vmap       one `launch.py --seeds=N --seed_batching=vmap` (stages whose copies have
             equal widths train as one vmapped program, `train.fit_copies`).
Wall seconds are measured around the processes, so the separate runs pay their start-up
(Python, imports, loading the npz) and their compilations N times, as they do in use.
The separate runs go twice: without a persistent compilation cache
(`--compilation_cache_dir=`), and (unless --nocached_runs, which saves N processes where
time is short) sharing one that starts empty, as launch.py's default cache directory makes
successive runs do; loop and vmap each start with an empty cache of their own. Each
process prints one progress line as it ends. Train-step compilations are counted from
JAX's compile log (JAX_LOG_COMPILES=1, set for all): the `Compiling` lines in each
process's stderr that name `sharded_train_step`, less the persistent cache's hits for it
(reported apart). The per-seed test accuracies are compared with the separate runs': on
the CPU loop promises the same numbers, vmap the same up to float rounding (the largest
difference is printed); on a GPU, whose kernels XLA does not make deterministic by
default, neither matched bit for bit (README section 6).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_integer('seeds', 5, 'Seeds: the --seeds=N runs against N separate runs.',
                     lower_bound=1)
flags.DEFINE_string('model', 'resnet20', 'Model.')
flags.DEFINE_integer('epochs', 1, 'Baseline (and scratch) epochs.', lower_bound=1)
flags.DEFINE_integer('max_train', 256, 'Training images used (of the sample\'s 10000).',
                     lower_bound=1)
flags.DEFINE_integer('batch_size', 128, 'Batch size (training and evaluation).', lower_bound=1)
flags.DEFINE_string('criterion', 'l1', 'Criterion (l1: data-free, so scoring costs little).')
flags.DEFINE_string('selection', 'global_l2', 'Selection policy (launch.py\'s default).')
flags.DEFINE_string('regime', 'scratch', 'Retraining regime.')
flags.DEFINE_string('data_path', None, 'The CIFAR-10 sample (.npz: 10000 training, 2000 '
                    'test images); required.')
flags.DEFINE_bool('cached_runs', True, 'Also time the separate runs sharing one persistent '
                  'compilation cache (N more processes).')
flags.DEFINE_string('out', None, 'Write the table as JSON here.')

STEP = 'sharded_train_step'


def launch(workdir: str, cache: str, *extra: str) -> dict:
  """Runs launch.py once; its wall seconds, train-step compiles and per-seed accuracies."""
  args = [sys.executable, os.path.join(ROOT, 'launch.py'), f'--workdir={workdir}',
          f'--compilation_cache_dir={cache}', f'--model={FLAGS.model}', '--dataset=npz',
          f'--data_path={FLAGS.data_path}',
          f'--max_train={FLAGS.max_train}', f'--epochs={FLAGS.epochs}',
          f'--batch_size={FLAGS.batch_size}', f'--criterion={FLAGS.criterion}',
          f'--selection={FLAGS.selection}', f'--regime={FLAGS.regime}', *extra]
  env = dict(os.environ, JAX_LOG_COMPILES='1')
  start = time.perf_counter()
  proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
  wall = time.perf_counter() - start
  common.check_child(proc, f'launch.py {extra}')
  print(f"launch.py {' '.join(extra)} (compilation cache: {os.path.basename(cache) or 'none'}): "
        f"{wall:.1f} s", flush=True)
  lines = proc.stderr.splitlines()
  traced = sum(1 for line in lines if 'Compiling' in line and STEP in line)
  hits = sum(1 for line in lines if 'Persistent compilation cache hit' in line and STEP in line)
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  per_seed = results.get('per_seed', [results])
  accuracies = [[row['test_accuracy'] for row in r['rows']] for r in per_seed]
  return {'wall_s': wall, 'train_step_compiles': traced - hits, 'train_step_cache_hits': hits,
          'accuracies': accuracies}


def _total(runs: list[dict]) -> dict:
  """Separate runs as one row: summed seconds and compiles, accuracies in seed order."""
  return {'wall_s': sum(r['wall_s'] for r in runs),
          'train_step_compiles': sum(r['train_step_compiles'] for r in runs),
          'train_step_cache_hits': sum(r['train_step_cache_hits'] for r in runs),
          'accuracies': [a for r in runs for a in r['accuracies']]}


def main(argv):
  del argv
  common.require_data_path(FLAGS.data_path)
  import jax
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    separate = [launch(os.path.join(tmp, f'separate{seed}'), '', f'--seed={seed}')
                for seed in range(FLAGS.seeds)]
    shared_cache = os.path.join(tmp, 'cache_separate')
    cached = [launch(os.path.join(tmp, f'cached{seed}'), shared_cache, f'--seed={seed}')
              for seed in range(FLAGS.seeds)] if FLAGS.cached_runs else []
    ways = {way: launch(os.path.join(tmp, way), os.path.join(tmp, f'cache_{way}'),
                        f'--seeds={FLAGS.seeds}', f'--seed_batching={way}')
            for way in ('loop', 'vmap')}
  separate_total = _total(separate)
  separate_s = separate_total['wall_s']
  separate_accuracies = np.array(separate_total['accuracies'])
  compared = [(f'{FLAGS.seeds} x --seed=i, no cache', separate_total)]
  if cached:
    compared.append((f'{FLAGS.seeds} x --seed=i, one cache', _total(cached)))
  compared += [(f'--seeds={FLAGS.seeds} --seed_batching={way}', r) for way, r in ways.items()]
  rows = []
  for name, r in compared:
    rows.append({'runs': name, 'wall_s': r['wall_s'], 'vs_separate': separate_s / r['wall_s'],
                 'train_step_compiles': r['train_step_compiles'],
                 'train_step_cache_hits': r['train_step_cache_hits'],
                 'max_accuracy_difference': float(np.max(np.abs(
                     np.array(r['accuracies']) - separate_accuracies)))})
  each = ', '.join(format(r['wall_s'], '.1f') for r in separate)
  each_cached = (', ' + ', '.join(format(r['wall_s'], '.1f') for r in cached) + ' s (one cache)'
                 if cached else '')
  print()
  print(f"launch.py on the CIFAR-10 sample ({FLAGS.model}, {FLAGS.epochs} epoch(s), "
        f"{FLAGS.max_train} images, {FLAGS.criterion}, {FLAGS.selection}, {FLAGS.regime}, "
        f"batch {FLAGS.batch_size}), backend {jax.default_backend()}; separate runs: {each} s "
        f"(no cache){each_cached}")
  print(common.format_table(rows, list(rows[0])))
  common.write_json(FLAGS.out, {'machine': common.machine(), 'load_average_before': load_before,
                                'settings': {k: FLAGS[k].value for k in (
                                    'model', 'epochs', 'max_train', 'batch_size', 'criterion',
                                    'selection', 'regime', 'seeds')},
                                'rows': rows,
                                'separate_wall_s': [r['wall_s'] for r in separate],
                                'cached_separate_wall_s': [r['wall_s'] for r in cached],
                                'separate_train_step_compiles': [r['train_step_compiles']
                                                                 for r in separate],
                                'accuracies': {'separate': separate_accuracies.tolist(),
                                               **{w: r['accuracies'] for w, r in ways.items()}}})


if __name__ == '__main__':
  common.run(main)
