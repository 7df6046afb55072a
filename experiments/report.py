r"""Rebuilds every experiment's tables and plots from the work directories alone.

    python -m experiments.report --root=runs/mini --out=experiments/results/mini

Reads the runner's snapshots (`WORKDIR/results_<regime>.json`), criteria_vs_oracle's
`agreement.json`, random_vs_criterion's `latency.json` and, for taylor_curves, each iterative
prune stage's `prune/finetune/pruning_curve.jsonl` (`common.is_result_file`); re-runs nothing.
`--archive=DIR` copies these files, and nothing else, to the same paths under DIR: kept beside
the tables (they are small), `--root=DIR` rebuilds the same tables after the work directories
and their checkpoints are gone. Mean +- std over seeds, std being the
sample standard deviation (ddof=1; "-" with a single seed).

Tables (Markdown and CSV) are byte-for-byte reproducible: rows sorted, keys sorted,
fixed float formats, no timestamps or absolute paths. PNGs are written with the Agg
backend and no metadata (no date, no software string); they are stable across reruns
with the same matplotlib and FreeType, but are not part of the byte-for-byte claim.
Without matplotlib the tables are still written and one line on stderr says the
plots were skipped.
"""

import csv
import io
import json
import math
import os
import sys
from collections import defaultdict
from typing import Mapping

import numpy as np
from absl import flags
from scipy import stats

from experiments import common


# ---------------------------------------------------------------------------- statistics

BOOTSTRAP_RESAMPLES = 10000
# What the verdicts and paired differences say before any comparison has a pair.
NO_PAIRS = ('None yet: no architecture trained from scratch has a finished random-scores '
            'or uniform run of the same seed and budget to be compared with.')
# The references every architecture of random_vs_criterion is compared with, paired by seed.
REFERENCES = ('random', 'uniform')


def mean_std(values) -> tuple[float, float]:
  """Mean and sample std (ddof=1; NaN for fewer than two values)."""
  values = np.asarray(list(values), np.float64)
  if values.size == 0:
    return float('nan'), float('nan')
  std = float(np.std(values, ddof=1)) if values.size > 1 else float('nan')
  return float(np.mean(values)), std


def percent_bar(accuracies) -> tuple[float, float]:
  """(mean, error bar) of accuracies in percent, for a plot; the bar is 0 for one seed."""
  mean, std = mean_std(accuracies)
  return 100 * mean, 0.0 if math.isnan(std) else 100 * std


def bootstrap_interval(values, level: float = 0.95,
                       resamples: int | None = None) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of `values` (NaN, NaN below two values).

  The values are resampled with replacement `resamples` times (BOOTSTRAP_RESAMPLES) by a
  generator of fixed seed, so a table is rebuilt to the same digits. Every resampled mean
  lies within [min, max] of the values: with two or three seeds the interval is coarse.
  """
  values = np.asarray(list(values), np.float64)
  if values.size < 2:
    return float('nan'), float('nan')
  rng = np.random.default_rng(0)
  draws = rng.integers(0, values.size, (resamples or BOOTSTRAP_RESAMPLES, values.size))
  means = values[draws].mean(axis=1)
  tail = (1 - level) / 2
  low, high = np.quantile(means, [tail, 1 - tail])
  return float(low), float(high)


def paired_seeds(by_seed: Mapping, reference_by_seed: Mapping) -> list:
  """The seeds both sides ran, in order: the pairs every paired statistic is over."""
  return sorted(set(by_seed) & set(reference_by_seed))


def paired_difference(by_seed: Mapping, reference_by_seed: Mapping) -> dict:
  """`by_seed` minus `reference_by_seed` over the seeds both ran ({seed: accuracy} each):
  {'seeds', 'diff' (mean), 'low', 'high' (its 95 % bootstrap interval), 'p' (paired t)}."""
  seeds = paired_seeds(by_seed, reference_by_seed)
  differences = [by_seed[s] - reference_by_seed[s] for s in seeds]
  low, high = bootstrap_interval(differences)
  return {'seeds': len(seeds), 'diff': float(np.mean(differences)) if seeds else float('nan'),
          'low': low, 'high': high, 'p': paired_p_value(by_seed, reference_by_seed)}


def paired_p_value(by_seed: Mapping, reference_by_seed: Mapping) -> float:
  """Two-sided p-value of a paired t-test over the seeds both sides ran (NaN below two).

  by_seed, reference_by_seed: {seed: accuracy}. Runs of one seed share their baseline,
  training data order and seed, so the design is paired by seed, and pairing removes the
  variation the seeds share. With 3 seeds the test has little power, and a table of
  many cells makes many comparisons: read p as evidence, not as a verdict.
  """
  seeds = paired_seeds(by_seed, reference_by_seed)
  if len(seeds) < 2:
    return float('nan')
  differences = np.array([by_seed[s] - reference_by_seed[s] for s in seeds], np.float64)
  if np.all(differences == differences[0]):
    # No variation in the differences: the t statistic is undefined (0 / 0 or x / 0).
    return float('nan')
  return float(stats.ttest_rel([by_seed[s] for s in seeds],
                               [reference_by_seed[s] for s in seeds]).pvalue)


# ---------------------------------------------------------------------------- formatting

def pct(x) -> str:
  return '-' if x is None or math.isnan(x) else f'{100 * x:.2f}'


def pm(values) -> str:
  mean, std = mean_std(values)
  if math.isnan(mean):
    return '-'
  return f'{100 * mean:.2f} ± {100 * std:.2f}' if not math.isnan(std) else f'{100 * mean:.2f}'


def p_text(p) -> str:
  if p is None or math.isnan(p):
    return '-'
  return '< 0.001' if p < 0.001 else f'{p:.3f}'


def num(x, digits=4) -> str:
  return '' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:.{digits}f}'


def _cell(value) -> str:
  # A '|' in a label (e.g. |w|) would end the cell.
  return str(value).replace('|', '\\|')


def markdown(header, rows) -> str:
  lines = ['| ' + ' | '.join(map(_cell, header)) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(map(_cell, row)) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def csv_text(header, rows) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(header)
  writer.writerows(rows)
  return buffer.getvalue()


# ---------------------------------------------------------------------------- reading

def load(root: str) -> dict:
  """{experiment: [snapshot dicts, each with '_dir': its work directory relative to root]};
  `root` is a local path or gs://.

  A damaged snapshot stops the report with one sentence naming it (SystemExit)."""
  found = defaultdict(list)
  for where, path in common.files_under(root):
    if path.name.endswith('.json'):
      _add(found, path, where)
  return {k: sorted(v, key=lambda s: (s['_dir'], s.get('run', ''))) for k, v in found.items()}


def _add(found: dict, path, where: str) -> None:
  """Files a snapshot (results_*.json) or criteria_vs_oracle's agreement.json under its
  experiment."""
  if path.name.startswith('results_'):
    snap = _read_snapshot(path, 'delete it and rerun its experiment, which rewrites it from '
                                'the finished stages')
    found[snap.get('experiment', 'unknown')].append(dict(snap, _dir=where))
  elif path.name == 'agreement.json':
    snap = _read_snapshot(path, 'delete it and rerun criteria_vs_oracle for it')
    found['criteria_vs_oracle'].append(dict(snap, _dir=where))


def _read_snapshot(path, advice: str) -> dict:
  try:
    snap = json.loads(path.read_text(encoding='utf-8'))
  except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
    sys.exit(f'error: {path} is damaged ({type(error).__name__}: {error}); {advice}.')
  if not isinstance(snap, dict):
    sys.exit(f'error: {path} is damaged (it holds no JSON object); {advice}.')
  return snap


def _row(snap, stage):
  return next(r for r in snap['rows'] if r['stage'] == stage)


def _last(snap):
  """The row of the regime the snapshot's run trained (results hold every finished one)."""
  regime = snap.get('config', {}).get('regime')
  return next((r for r in snap['rows'] if r['stage'] == regime), snap['rows'][-1])


def _baseline(snap):
  return _row(snap, 'baseline')


def _best(row) -> float:
  """A row's best epoch's test accuracy (results from before it was recorded: the final)."""
  return row.get('best_test_accuracy', row['test_accuracy'])


def _seed(snap):
  return snap['config']['seed']


# ---------------------------------------------------------------------------- experiments

def _architecture(snap) -> str:
  labels = snap['labels']
  name = labels.get('architecture', labels['criterion'])
  return f'{name} (random channels)' if labels.get('channels') == 'random' else name


def _regime_group(snap) -> str:
  """The regime column: the selection is part of it (macs and macs_l2 are different
  experiments); a control (uniform, sampled profiles) is labelled with the selection of the
  criteria it stands beside."""
  labels = snap['labels']
  selection = labels.get('selection', snap['config'].get('selection', 'macs'))
  return labels['regime'] + (f' ({selection})' if selection != 'macs' else '')


def _interval_text(low, high) -> str:
  if math.isnan(low):
    return '-'
  return f'[{100 * low:+.2f}, {100 * high:+.2f}]'


def _called(c: dict) -> bool:
  """Whether a paired difference is reported as real: its 95 % bootstrap interval excludes 0
  and the paired t-test's p is below 0.05. With two or three seeds the bootstrap interval is
  the range of the differences (any three of one sign exclude 0), so it is not enough alone."""
  return (c['low'] > 0 or c['high'] < 0) and not math.isnan(c['p']) and c['p'] < 0.05


def _size(c: dict) -> tuple:
  """Orders paired differences by magnitude, either sign; names break ties reproducibly."""
  return abs(c['diff']), c['architecture'], c['reference']


def _verdict(budget: float, regime: str, seeds: int, comparisons: list) -> str:
  """One sentence that says only what the intervals and tests support."""
  where = f'At {100 * budget:.0f} % of the MACs ({regime}, {seeds} seed{"s" * (seeds != 1)})'
  measured = [c for c in comparisons if not math.isnan(c['low'])]
  if not measured:
    widest = max(comparisons, key=_size)
    return (f'{where}: fewer than two paired seeds, so no interval; the largest single '
            f"difference, {widest['architecture']} minus {widest['reference']}, is "
            f"{100 * widest['diff']:+.2f} pp and says nothing beyond one draw.")
  called = [c for c in measured if _called(c)]
  if not called:
    widest = max(measured, key=_size)
    return (f'{where}: no architecture differs from random scores or from uniform by more '
            'than the seeds allow (no 95 % interval excludes 0 with p < 0.05); the largest '
            f"difference, {widest['architecture']} minus {widest['reference']}, is "
            f"{100 * widest['diff']:+.2f} pp, interval "
            f"{_interval_text(widest['low'], widest['high'])}, p {p_text(widest['p'])}.")
  parts = [f"{c['architecture']} {'beats' if c['low'] > 0 else 'trails'} {c['reference']}: "
           f"{100 * c['diff']:+.2f} pp {_interval_text(c['low'], c['high'])}, "
           f"p {p_text(c['p'])}" for c in called]
  rest = len(measured) - len(called)
  tail = ('' if not rest else '; the other difference is within what the seeds allow'
          if rest == 1 else f'; the other {rest} differences are within what the seeds allow')
  return f"{where}: {'; '.join(parts)}{tail}."


def _latency(root: str | None) -> dict:
  from etils import epath
  path = epath.Path(root) / 'random_vs_criterion' / 'latency.json' if root else None
  if path is None or not path.exists():
    return {}
  return json.loads(path.read_text())


def _unpruned_baselines(snaps) -> dict:
  """{(model, unpruned network's name): {(baseline, seed): its baseline row}}: each once."""
  from experiments.architecture_latency import unpruned_name
  baselines = defaultdict(dict)
  for s in snaps:
    c = s['config']
    name = unpruned_name(c['model'], c['width_multiplier'], c['dataset'])
    baselines[(c['model'], name)][(c['baseline_dir'] or s['_dir'], _seed(s))] = _baseline(s)
  return baselines


def _cells_row(budget: float, regime: str, architecture: str, seeds: int, accs: list,
               kept: list, params: list, epochs: list, timed: list) -> tuple[list, list]:
  """One row of the cells table, as Markdown and as CSV."""
  mean, std = mean_std(accs)
  low, high = bootstrap_interval(accs)
  row = [f'{budget:.2f}', regime, architecture, seeds, pm(accs),
         _interval_text(low, high).replace('+', ''), f'{100 * np.mean(kept):.1f}',
         f'{np.mean(params):.0f}', f'{np.mean(epochs):.1f}',
         _ms(t.get('ms_batch1') for t in timed), _ms(t.get('ms_batch128') for t in timed)]
  csv_row = [f'{budget:.2f}', regime, architecture, seeds, num(mean), num(std), num(low),
             num(high), num(float(np.mean(kept))), f'{np.mean(params):.1f}']
  return row, csv_row


def _unpruned_rows(baselines: dict, several_models: bool, timings: dict) -> tuple[list, list]:
  """The unpruned networks' rows of the cells table: their seeds' baselines and latency."""
  rows, csv_rows = [], []
  for (model, name), by_seed in sorted(baselines.items()):
    regime = f'{model}: baseline' if several_models else 'baseline'
    row, csv_row = _cells_row(1.0, regime, 'unpruned', len(by_seed),
                              [r['test_accuracy'] for r in by_seed.values()], [1.0],
                              [r['params'] for r in by_seed.values()],
                              [r['epochs'] for r in by_seed.values()], [timings.get(name, {})])
    rows.append(row)
    csv_rows.append(csv_row)
  return rows, csv_rows


def _ms(values) -> str:
  values = [v for v in values if v is not None]
  return f'{np.median(values):.2f}' if values else '-'


def random_vs_criterion(snaps, out, write, root=None):
  cells = defaultdict(list)     # (budget, regime group, architecture) -> snaps
  several_models = len({s['config']['model'] for s in snaps}) > 1
  for s in snaps:
    group = _regime_group(s)
    if several_models:
      group = f"{s['config']['model']}: {group}"
    cells[(s['labels']['budget'], group, _architecture(s))].append(s)
  latency = _latency(root)
  timings = latency.get('runs', {})
  budgets = sorted({k[0] for k in cells}, reverse=True)
  groups = sorted({k[1] for k in cells})
  baselines = _unpruned_baselines(snaps)
  cell_rows, cell_csv = _unpruned_rows(baselines, several_models, latency.get('unpruned', {}))
  comparison_rows, comparison_csv, verdicts = [], [], []
  for budget in budgets:
    for regime in groups:
      by_seed = {a: {_seed(s): _last(s)['test_accuracy'] for s in v}
                 for (b, r, a), v in cells.items() if b == budget and r == regime}
      if not by_seed:
        continue
      for architecture in sorted(by_seed):
        group = cells[(budget, regime, architecture)]
        row, csv_row = _cells_row(
            budget, regime, architecture, len(group),
            [by_seed[architecture][seed] for seed in sorted(by_seed[architecture])],
            [_last(s)['macs'] / _baseline(s)['macs'] for s in group],
            [_last(s)['params'] for s in group], [_last(s)['epochs'] for s in group],
            [timings.get(s['run'], {}) for s in group])
        cell_rows.append(row)
        cell_csv.append(csv_row)
      comparisons = []
      for reference in REFERENCES:
        if reference not in by_seed:
          continue
        for architecture in sorted(by_seed):
          if architecture in REFERENCES[:REFERENCES.index(reference) + 1]:
            continue
          c = paired_difference(by_seed[architecture], by_seed[reference])
          if c['seeds'] == 0:
            continue
          comparisons.append(dict(c, architecture=architecture, reference=reference))
          comparison_rows.append([f'{budget:.2f}', regime, architecture, reference, c['seeds'],
                                  f"{100 * c['diff']:+.2f}", _interval_text(c['low'], c['high']),
                                  p_text(c['p'])])
          comparison_csv.append([f'{budget:.2f}', regime, architecture, reference, c['seeds'],
                                 num(c['diff']), num(c['low']), num(c['high']), num(c['p'])])
      if comparisons:
        seeds = max(len(v) for v in by_seed.values())
        verdicts.append([f'{budget:.2f}', regime, _verdict(budget, regime, seeds, comparisons)])
  channel_rows = _channel_comparison(cells)
  base = [r['test_accuracy'] for by_seed in baselines.values() for r in by_seed.values()]
  model = sorted({s['config']['model'] for s in snaps})
  text = ['# random_vs_criterion\n',
          f"Model(s): {', '.join(model)}; unpruned baselines: {pm(base)} % over "
          f"{len(base)} seed{'s' if len(base) != 1 else ''}. {wall_time_line(snaps)}\n",
          stand_in_line('random_vs_criterion', snaps).rstrip('\n') + '\n',
          'Architectures of equal cost: each criterion\'s pruned widths, `random` (random '
          'scores, the same selection), `uniform` (every width scaled by one factor to '
          "random's MACs) and `profileN` (randomly sampled width profiles at the budget).\n",
          '## Verdicts\n',
          'A difference is called when its 95 % bootstrap interval excludes 0 and the paired '
          't-test gives p < 0.05; with two or three seeds the bootstrap interval is the range of '
          'the differences, so it is not enough alone.\n',
          markdown(['budget (MACs kept)', 'regime', 'what the seeds support'], verdicts)
          if verdicts else f'{NO_PAIRS}\n',
          '## Paired differences\n',
          'Each architecture minus a reference, paired by seed (runs of one seed share their '
          'baseline and data order): mean over the paired seeds, its 95 % percentile '
          f'bootstrap interval ({BOOTSTRAP_RESAMPLES:,} resamples of the seeds; with n seeds it '
          'lies within the range of the n differences, so with 2 or 3 seeds it is coarse) and '
          "the two-sided paired t-test's p. With many cells, a small p here and there is "
          'expected by chance.\n',
          markdown(['budget (MACs kept)', 'regime', 'architecture', 'minus', 'seeds',
                    'difference (pp)', '95 % interval (pp)', 'p (paired t)'], comparison_rows)
          if comparison_rows else f'{NO_PAIRS}\n']
  if channel_rows:
    text += ['## Channels or widths?\n',
             "Fine-tuned from the baseline's weights at a criterion's widths: the criterion's "
             'own channels minus channels drawn at random within each group, paired by '
             'seed.\n',
             markdown(['budget (MACs kept)', 'criterion', 'seeds', 'own channels acc %',
                       'random channels acc %', 'difference (pp)', '95 % interval (pp)',
                       'p (paired t)'], channel_rows)]
  text += ['## All cells\n',
           'Test accuracy of the retrained network (last epoch), mean ± sample std over seeds '
           'and the 95 % bootstrap interval of the mean; inference latency on the machine '
           '`--latency` ran on (median ms per batch, eval mode; "-": not timed). The unpruned '
           "rows are the seeds' baselines, the networks every architecture was pruned from.\n",
           markdown(['budget (MACs kept)', 'regime', 'architecture', 'seeds',
                     'test acc % (mean ± std)', '95 % interval (%)', 'MACs kept %', 'params',
                     'epochs', 'ms, batch 1', 'ms, batch 128'], cell_rows)]
  write('random_vs_criterion.md', '\n'.join(text))
  write('random_vs_criterion.csv', csv_text(
      ['budget', 'regime', 'architecture', 'seeds', 'acc_mean', 'acc_std', 'acc_low', 'acc_high',
       'macs_kept_mean', 'params_mean'], cell_csv))
  write('random_vs_criterion_paired.csv', csv_text(
      ['budget', 'regime', 'architecture', 'reference', 'seeds', 'diff', 'low', 'high',
       'p_paired_t'], comparison_csv))
  write('random_vs_criterion_verdict.csv', csv_text(['budget', 'regime', 'verdict'], verdicts))
  _plot_budgets(cells, groups, out)


def _channel_comparison(cells) -> list:
  rows = []
  for (budget, regime, architecture), group in sorted(cells.items()):
    if 'finetune' not in regime or architecture.endswith('(random channels)'):
      continue
    drawn = cells.get((budget, regime, f'{architecture} (random channels)'))
    if not drawn:
      continue
    own = {_seed(s): _last(s)['test_accuracy'] for s in group}
    other = {_seed(s): _last(s)['test_accuracy'] for s in drawn}
    # The accuracies beside a paired difference are over the same seeds as the difference.
    paired = paired_seeds(own, other)
    own, other = ({seed: side[seed] for seed in paired} for side in (own, other))
    c = paired_difference(own, other)
    rows.append([f'{budget:.2f}', architecture, c['seeds'], pm(own.values()),
                 pm(other.values()), f"{100 * c['diff']:+.2f}" if c['seeds'] else '-',
                 _interval_text(c['low'], c['high']), p_text(c['p'])])
  return rows


def _plot_budgets(cells, regimes, out):
  plt = _pyplot()
  if plt is None or out is None:
    return
  for regime in regimes:
    fig, ax = plt.subplots(figsize=(6, 4))
    for architecture in sorted({k[2] for k in cells if k[1] == regime}):
      points = []
      for (b, r, a), group in sorted(cells.items()):
        if r == regime and a == architecture:
          accs = [_last(s)['test_accuracy'] for s in group]
          mean = float(np.mean(accs))
          low, high = bootstrap_interval(accs)
          spread = (0.0, 0.0) if math.isnan(low) else (mean - low, high - mean)
          points.append((np.mean([_last(s)['macs'] / _baseline(s)['macs'] for s in group]),
                         100 * mean, 100 * spread[0], 100 * spread[1]))
      points.sort()
      xs, ys, below, above = map(np.asarray, zip(*points))
      ax.errorbar(xs, ys, yerr=np.stack([below, above]), marker='o', capsize=3,
                  label=architecture)
    ax.set_xlabel('MACs kept (fraction of the unpruned network)')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(f'random_vs_criterion: {regime}\n(mean over seeds, 95 % bootstrap interval)',
                 fontsize=9)
    ax.legend(fontsize=7)
    slug = ''.join(ch if ch.isalnum() or ch == '_' else '_' for ch in regime).strip('_')
    _save(fig, os.path.join(out, f'random_vs_criterion_{slug}.png'))


def generic(name, snaps, write, label_keys, intro: str = ''):
  """One row per label combination (seeds pooled): accuracy, MACs, params, epochs."""
  groups = defaultdict(list)
  for s in snaps:
    key = tuple(str(s['labels'].get(k, '')) for k in label_keys)
    groups[key].append(s)
  header = list(label_keys) + ['model', 'seeds', 'test acc % (mean ± std)', 'pruned acc %',
                               'baseline acc %', 'MACs (M)', 'params', 'epochs']
  csv_header = list(label_keys) + ['model', 'seeds', 'acc_mean', 'acc_std', 'pruned_acc_mean',
                                   'baseline_acc_mean', 'macs_mean', 'params_mean', 'epochs_mean']
  md_rows, csv_rows = [], []
  for key in sorted(groups):
    group = groups[key]
    accs = [_last(s)['test_accuracy'] for s in group]
    # A reduced network is not the pruned one; its row leaves the pruned accuracy out.
    pruned = [_row(s, 'pruned')['test_accuracy'] for s in group
              if s['labels'].get('regime') != 'reduced']
    base = [_baseline(s)['test_accuracy'] for s in group]
    macs = np.mean([_last(s)['macs'] for s in group])
    params = np.mean([_last(s)['params'] for s in group])
    epochs = np.mean([_last(s)['epochs'] for s in group])
    models = ','.join(sorted({s['config']['model'] for s in group}))
    mean, std = mean_std(accs)
    md_rows.append(list(key) + [models, len(group), pm(accs), pm(pruned), pm(base),
                                f'{macs / 1e6:.3f}', f'{params:.0f}', f'{epochs:.1f}'])
    csv_rows.append(list(key) + [models, len(group), num(mean), num(std),
                                 num(mean_std(pruned)[0]), num(mean_std(base)[0]),
                                 f'{macs:.1f}', f'{params:.1f}', f'{epochs:.2f}'])
  write(f'{name}.md', f'# {name}\n\n{wall_time_line(snaps)}\n\n{stand_in_line(name, snaps)}'
        f'{intro}' + markdown(header, md_rows))
  write(f'{name}.csv', csv_text(csv_header, csv_rows))


def stand_in_line(experiment: str, snaps) -> str:
  """Names the full-scale model a smaller one stands in for (empty when they are the same)."""
  import importlib
  defaults = getattr(importlib.import_module(f'experiments.{experiment}'), 'DEFAULTS', {})
  full = defaults.get('full', {}).get('model')
  used = sorted({s['config']['model'] for s in snaps})
  if full is None or used == [full]:
    return ''
  return (f"{', '.join(used)} stands in for {full}, the model of `--scale=full`; the numbers "
          'are not the paper\'s.\n\n')


def wall_time_line(snaps) -> str:
  """The runs' summed wall time as the snapshots recorded it (shared baselines count once)."""
  total = sum(s.get('run_wall_time_s', 0.0) for s in snaps)
  return (f'{len(snaps)} runs; their wall times, as recorded in the snapshots, sum to '
          f'{total / 60:.1f} min (the command\'s own wall time is in RUN.md).')


RETHINKING_COLUMNS = (('finetune', 'fine-tuned'), ('scratch', 'scratch-E'),
                      ('scratch_b', 'scratch-B'), ('lottery', 'lottery (original init)'))
# [R]'s claims, each a comparison of two retrainings of one pruned network: (regime, against).
RETHINKING_COMPARISONS = (('scratch', 'finetune'), ('scratch_b', 'finetune'),
                          ('lottery', 'scratch'))


def rethinking_table(snaps) -> str:
  """[R]'s layout: one row per pruned network, one column per way of retraining it."""
  groups = defaultdict(list)
  for s in snaps:
    groups[(s['labels']['method'], s['labels']['preset'])].append(s)
  header = ['method', 'model / target', 'seeds', 'unpruned %', 'MACs kept %', 'params kept %']
  header += [title + ' %' for _, title in RETHINKING_COLUMNS]
  rows, best_rows, time_rows, tests = [], [], [], []
  titles = dict(RETHINKING_COLUMNS)
  for key in sorted(groups):
    group = groups[key]
    by_regime = defaultdict(dict)  # regime -> {seed: accuracy}
    best_by_regime = defaultdict(dict)
    minutes = defaultdict(list)
    for s in group:
      by_regime[s['labels']['regime']][_seed(s)] = _last(s)['test_accuracy']
      best_by_regime[s['labels']['regime']][_seed(s)] = _best(_last(s))
      if 'wall_time_s' in _last(s):
        minutes[s['labels']['regime']].append(_last(s)['wall_time_s'] / 60)
    seed_order = {r: [acc for _, acc in sorted(accs.items())] for r, accs in by_regime.items()}
    for regime, against in RETHINKING_COMPARISONS:
      if regime in by_regime and against in by_regime:
        diff = np.mean(seed_order[regime]) - np.mean(seed_order[against])
        tests.append(list(key) + [f'{titles[regime]} - {titles[against]}', f'{100 * diff:+.2f}',
                                  p_text(paired_p_value(by_regime[regime], by_regime[against]))])
    base = {_seed(s): _baseline(s) for s in group}
    pruned = [_row(s, 'pruned') for s in group]
    kept = np.mean([p['macs'] / base[_seed(s)]['macs'] for p, s in zip(pruned, group)])
    params = np.mean([p['params'] / base[_seed(s)]['params'] for p, s in zip(pruned, group)])
    rows.append(list(key) + [len(base), pm(b['test_accuracy'] for _, b in sorted(base.items())),
                             f'{100 * kept:.1f}', f'{100 * params:.1f}'] +
                [pm(seed_order.get(regime, [])) for regime, _ in RETHINKING_COLUMNS])
    best_rows.append(list(key) + [pm(_best(b) for _, b in sorted(base.items())),
                                  pm([p['test_accuracy'] for p in pruned])] +
                     [pm([a for _, a in sorted(best_by_regime.get(regime, {}).items())])
                      for regime, _ in RETHINKING_COLUMNS])
    base_minutes = [b['wall_time_s'] / 60 for b in base.values() if 'wall_time_s' in b]
    time_rows.append(list(key) + [f'{np.mean(base_minutes):.1f}' if base_minutes else ''] +
                     [f'{np.mean(minutes[regime]):.1f}' if regime in minutes else ''
                      for regime, _ in RETHINKING_COLUMNS])
  titled = [title + ' %' for _, title in RETHINKING_COLUMNS]
  return ('Test accuracy after the last epoch (mean ± std over seeds) of each pruned network '
        'retrained four ways; scratch-E and lottery train the pruned architecture from a '
        'random and from the original initialisation for the baseline\'s epochs, scratch-B '
        'for as many MACs x steps as the baseline.\n\n' + markdown(header, rows) +
        '\nThe best epoch\'s test accuracy (what [R]\'s code reports; "pruned" is before any '
        'retraining):\n\n' +
        markdown(['method', 'model / target', 'unpruned %', 'pruned %'] + titled, best_rows) +
        '\nWall time per run (minutes; the baseline once per seed):\n\n' +
        markdown(['method', 'model / target', 'unpruned'] +
                 [title for _, title in RETHINKING_COLUMNS], time_rows) +
        '\nThe comparisons [R] draws, as differences of the means and the two-sided p-value of a '
        'paired t-test over the seeds (a seed\'s retrainings share its baseline and pruned '
        'network):\n\n' +
        markdown(['method', 'model / target', 'comparison', 'difference (pp)', 'p (paired t)'],
                 tests) + '\nEvery run:\n\n')


def crowley_plot(snaps, out):
  """Accuracy against parameters: fisher-pruned (fine-tuned, from scratch) vs uniformly reduced."""
  plt = _pyplot()
  if plt is None or out is None or not snaps:
    return
  series = defaultdict(lambda: defaultdict(list))    # (family, regime) -> budget -> snaps
  base = {}
  for s in snaps:
    series[(s['labels']['family'], s['labels']['regime'])][s['labels']['budget']].append(s)
    base[_seed(s)] = _baseline(s)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for (family, regime), by_budget in sorted(series.items()):
    xs, ys, es = [], [], []
    for budget in sorted(by_budget):
      group = by_budget[budget]
      xs.append(np.mean([_last(s)['params'] for s in group]))
      y, e = percent_bar([_last(s)['test_accuracy'] for s in group])
      ys.append(y)
      es.append(e)
    ax.errorbar(xs, ys, yerr=es, marker='o', capsize=3, label=f'{family}, {regime}')
  y, e = percent_bar([b['test_accuracy'] for b in base.values()])
  ax.errorbar([np.mean([b['params'] for b in base.values()])], [y], yerr=[e], marker='*',
              markersize=10,
              linestyle='none', color='black', label='unpruned')
  ax.set_xlabel('parameters')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title('crowley (mean ± std over seeds)')
  ax.legend(fontsize=7)
  _save(fig, os.path.join(out, 'crowley.png'))


def criteria_vs_oracle(snaps, write):
  per = defaultdict(lambda: defaultdict(list))   # criterion -> measure -> [per seed]
  layer = defaultdict(lambda: defaultdict(list))
  for s in snaps:
    for criterion, a in sorted(s['criteria'].items()):
      for measure in ('mean_per_layer', 'across_layers_normalized', 'across_layers_raw'):
        per[criterion][measure].append(a[measure])
      for g, rho in sorted(a['per_layer'].items()):
        layer[criterion][g].append(rho)
  header = ['criterion', 'seeds', 'per layer (mean rho)', 'across layers, L2-normalised',
            'across layers, raw']

  def f(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    mean, std = mean_std(values)
    if math.isnan(mean):
      return '-'
    return f'{mean:.3f} ± {std:.3f}' if not math.isnan(std) else f'{mean:.3f}'
  rows = [[c, len(per[c]['mean_per_layer']), f(per[c]['mean_per_layer']),
           f(per[c]['across_layers_normalized']), f(per[c]['across_layers_raw'])]
          for c in sorted(per)]
  groups = sorted({g for c in layer for g in layer[c]})
  layer_rows = [[c] + [f(layer[c].get(g, [])) for g in groups] for c in sorted(layer)]
  models = ', '.join(sorted({s['config']['model'] for s in snaps}))
  skipped = sorted({f'{c}: {m}' for s in snaps for c, m in s.get('skipped', {}).items()})
  notes = ''.join(f'\nNot scored: {line}\n' for line in skipped)
  write('criteria_vs_oracle.md',
        f'# criteria_vs_oracle\n\nSpearman rho against the oracle, model {models}, mean ± std '
        'over seeds.\n\n' + stand_in_line('criteria_vs_oracle', snaps) + markdown(header, rows) +
        '\nPer layer:\n\n' + markdown(['criterion'] + groups, layer_rows) + notes)
  write('criteria_vs_oracle.csv', csv_text(header, rows))


def taylor_curves(snaps, root, out, write):
  """Accuracy during iterative pruning against the MACs kept [M], per criterion and interval.

  Reads each prune stage's `prune/finetune/pruning_curve.jsonl` (one point per epoch:
  test accuracy and the exact MACs of the masked network). Seeds share the schedule,
  so the i-th points of a criterion's seeds are averaged.
  """
  curves = defaultdict(list)       # (prune_every, criterion) -> [[points] per seed]
  rows = []
  for s in snaps:
    path = os.path.join(root, s['_dir'], 'prune', 'finetune', 'pruning_curve.jsonl')
    if not os.path.exists(path):
      continue
    c = s['config']
    full = _baseline(s)['macs']
    with open(path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    points = [(1.0, _baseline(s)['test_accuracy'])]
    points += [(r['macs'] / full, r['test_accuracy']) for r in records]
    curves[(c['prune_every'], c['criterion'])].append(points)
    for r in records:
      rows.append([c['criterion'], c['prune_every'], c['seed'], r['epoch'],
                   r['channels_removed'], num(r['macs'] / full), num(r['test_accuracy'])])
  write('taylor_curves_points.csv', csv_text(
      ['criterion', 'prune_every', 'seed', 'epoch', 'channels_removed', 'macs_kept',
       'test_accuracy'], sorted(rows)))
  plt = _pyplot()
  if plt is None or out is None or not curves:
    return
  intervals = sorted({every for every, _ in curves})
  fig, axes = plt.subplots(1, len(intervals), figsize=(5 * len(intervals), 3.5), squeeze=False)
  for ax, every in zip(axes[0], intervals):
    for (e, criterion), seeds in sorted(curves.items()):
      if e != every:
        continue
      n = min(len(p) for p in seeds)
      x = np.mean([[p[i][0] for i in range(n)] for p in seeds], axis=0)
      y = 100 * np.asarray([[p[i][1] for i in range(n)] for p in seeds])
      std = y.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(n)
      ax.errorbar(x, y.mean(axis=0), yerr=std, marker='.', capsize=2, label=criterion)
    ax.invert_xaxis()
    ax.set_xlabel('MACs kept (fraction of the unpruned network)')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(f'fine-tuning {every} steps between removals')
    ax.legend(fontsize=8)
  _save(fig, os.path.join(out, 'taylor_curves.png'))


# ---------------------------------------------------------------------------- plumbing

def _pyplot():
  try:
    import matplotlib
  except ImportError:
    return None
  matplotlib.use('Agg')
  matplotlib.rcParams['svg.hashsalt'] = 'jaxprune'
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path):
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=100, metadata={'Software': None})
  plt.close(fig)


# The experiments whose results include a plot.
PLOTTED = ('random_vs_criterion', 'crowley', 'taylor_curves')

LABELS = {
    'rethinking': ('method', 'preset', 'regime'),
    'crowley': ('family', 'budget', 'regime'),
    'taylor_curves': ('criterion', 'prune_every', 'regime'),
}


def build(root: str, out: str) -> list[str]:
  """Writes every table (and plot) for what is under `root`; returns the files written."""
  os.makedirs(out, exist_ok=True)
  written = []

  def write(name, text):
    with open(os.path.join(out, name), 'w') as f:
      f.write(text)
    written.append(name)
  found = load(root)
  for name in sorted(found):
    snaps = found[name]
    if name == 'random_vs_criterion':
      random_vs_criterion(snaps, out, write, root)
    elif name == 'criteria_vs_oracle':
      criteria_vs_oracle(snaps, write)
    elif name == 'taylor_curves':
      taylor_curves(snaps, root, out, write)
      generic(name, snaps, write, LABELS[name])
    elif name == 'rethinking':
      generic(name, snaps, write, LABELS[name], intro=rethinking_table(snaps))
    elif name == 'crowley':
      generic(name, snaps, write, LABELS[name])
      crowley_plot(snaps, out)
    else:
      generic(name, snaps, write, LABELS.get(name, ('criterion', 'regime')))
  if _pyplot() is None and any(name in found for name in PLOTTED):
    print("plots skipped: matplotlib is not installed (pip install -e '.[plots]' installs it).",
          file=sys.stderr)
  index = ['# Experiment results\n', f'Built by `python -m experiments.report` from {len(found)} '
           'experiment(s):\n'] + [f'* [{n}]({n}) ' for n in sorted(written) if n.endswith('.md')]
  write('index.md', '\n'.join(index) + '\n')
  return sorted(written) + sorted(n for n in os.listdir(out) if n.endswith('.png'))


def _reason(error: OSError) -> str:
  return f'{error.strerror or error}{f" ({error.filename})" if error.filename else ""}'


def main(argv=None):
  flag_values = flags.FlagValues()
  flags.DEFINE_string('root', None, 'The --root the experiments ran with.',
                      flag_values=flag_values, required=True)
  flags.DEFINE_string('out', None, 'Where to write the tables and plots.',
                      flag_values=flag_values, required=True)
  flags.DEFINE_string('archive', None, 'Also copy every file the tables are built from '
                      '(results_*.json, agreement.json, latency.json, pruning_curve.jsonl) to '
                      'the same paths under this directory: --root=ARCHIVE then rebuilds the '
                      'same tables without the work directories.', flag_values=flag_values)
  from jaxprune.errors import exit_on_user_error
  with exit_on_user_error():
    args = common.parse(flag_values, argv, 'python -m experiments.report', __doc__)
  from etils import epath
  from jaxprune import storage
  storage.configure()  # gs:// roots: gcsfs's settings for reading what other processes wrote
  if not epath.Path(args.root).is_dir():
    sys.exit(f'error: --root {args.root!r} is not a directory.')
  if not load(args.root):
    sys.exit(f"error: no experiment results (results_*.json or agreement.json files) under "
             f"{args.root!r}; give the --root the experiments ran with.")
  if args.archive:   # first: the inputs are kept even if a table cannot be written
    try:
      copied = common.copy_results(args.root, args.archive)
    except OSError as error:
      sys.exit(f'error: cannot copy the results to --archive {args.archive!r}: {_reason(error)}.')
    print(f'{copied} result files copied to {args.archive}')
  try:
    written = build(args.root, args.out)
  except OSError as error:
    sys.exit(f'error: cannot write the tables to --out {args.out!r}: {_reason(error)}.')
  for name in written:
    print(os.path.join(args.out, name))

if __name__ == '__main__':
  main()
