"""A run's results.json, its flagfile, and the summary table printed at the end."""

import dataclasses
import json
import platform
from typing import Mapping

import jax
import numpy as np
from absl import logging
from etils import epath

from jaxprune import errors
from jaxprune.pipeline import config as config_lib
from jaxprune.train import checkpoint

# The settings that name directories. A flagfile line loses its trailing whitespace (absl
# strips every line), so such a value is written with '/.' after it: the same directory.
_DIRECTORY_SETTINGS = ('workdir', 'baseline_dir', 'data_dir', 'compilation_cache_dir')


def versions() -> dict:
  import flax
  import optax
  import orbax.checkpoint
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': getattr(jax.lib, '__version__', None), 'flax': flax.__version__,
          'optax': optax.__version__, 'orbax-checkpoint': orbax.checkpoint.__version__,
          'numpy': np.__version__}


def write(config, body: Mapping) -> dict:
  """`body` with the configuration, performance options, versions and devices, written
  (by process 0) as WORKDIR/results.json, with WORKDIR/launch.flags that reruns it."""
  results = {**body, 'config': dataclasses.asdict(config),
             'performance': config_lib.performance_options(config).as_dict(),
             'versions': versions(), 'devices': [d.device_kind for d in jax.devices()],
             'platform': jax.default_backend()}
  workdir = epath.Path(config.workdir)
  try:
    checkpoint.write_text(workdir / 'results.json', json.dumps(results, indent=1))
    checkpoint.write_text(workdir / 'launch.flags', _flagfile(config))
  except OSError as error:
    if errors.storage_error(error) is None:
      raise
    # The results are computed and returned; only their copy on disk is missing.
    logging.warning('results not saved: %s', errors.describe_storage_error(error))
  return results


def _flagfile(config) -> str:
  values = {name: getattr(config, name) for name in _DIRECTORY_SETTINGS}
  return config_lib.to_flagfile(dataclasses.replace(config, **{
      name: f'{value}/.' for name, value in values.items() if value and value != value.rstrip()}))


def mean_rows(per_seed: list[Mapping]) -> list[dict]:
  """One row per stage that every seed has: the mean over seeds, and the test accuracy's
  std (ddof 1)."""
  by_stage = [{r['stage']: r for r in seed['rows']} for seed in per_seed]
  rows = []
  for row in per_seed[0]['rows']:
    stage = row['stage']
    if not all(stage in seed for seed in by_stage):
      continue
    keys = [k for k in ('test_accuracy', 'best_test_accuracy', 'macs', 'params', 'epochs',
                        'wall_time_s') if all(k in seed[stage] for seed in by_stage)]
    values = {k: np.array([seed[stage][k] for seed in by_stage], float) for k in keys}
    rows.append({'stage': stage, **{k: float(v.mean()) for k, v in values.items()},
                 'test_accuracy_std': float(values['test_accuracy'].std(ddof=1)),
                 'seeds': len(per_seed),
                 **({'settings': row['settings']} if 'settings' in row else {})})
  return rows


def format_table(results: Mapping) -> str:
  """The summary table: one row per stage, its final test accuracy and the best epoch's."""
  spread = 'test_accuracy_std' in results['rows'][0]
  accuracy, width = ('test acc (mean ± std)', 21) if spread else ('test acc', 9)
  header = (f"{'stage':<10} {accuracy:>{width}} {'best':>7} {'MACs':>10} {'params':>10} "
            f"{'epochs':>7} {'time':>8}")
  lines = [header, '-' * len(header)]
  for row in results['rows']:
    acc = f"{100 * row['test_accuracy']:.2f}%"
    if spread:
      acc += f" ± {100 * row['test_accuracy_std']:.2f}"
    best = row.get('best_test_accuracy')
    best = '' if best is None else f'{100 * best:.2f}%'
    lines.append(f"{row['stage']:<10} {acc:>{width}} {best:>7} "
                 f"{row['macs'] / 1e6:>9.2f}M {row['params'] / 1e6:>9.3f}M {row['epochs']:>7g} "
                 f"{row['wall_time_s']:>7.1f}s")
  lines.append('test acc: after the last epoch; best: the best epoch\'s (as [R]\'s code '
               'reports).')
  return '\n'.join(lines)
