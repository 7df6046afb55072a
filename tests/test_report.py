"""The report tool without matplotlib: tables still written, one line saying plots were skipped."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import report  # noqa: E402


def _snapshot(root, criterion, seed, acc):
  workdir = root / 'random_vs_criterion' / criterion / 'macs0.50' / f's{seed}'
  workdir.mkdir(parents=True)
  snap = {'experiment': 'random_vs_criterion', 'run': f'{criterion}/0.5/{seed}/scratch',
          'labels': {'criterion': criterion, 'budget': 0.5, 'seed': seed, 'regime': 'scratch'},
          'config': {'model': 'tiny', 'width_multiplier': 1.0, 'dataset': 'digits', 'seed': seed,
                     'baseline_dir': f'b{seed}'},
          'rows': [{'stage': 'baseline', 'test_accuracy': 0.6, 'macs': 1000, 'params': 100,
                    'epochs': 3, 'wall_time_s': 1.0},
                   {'stage': 'scratch', 'test_accuracy': acc, 'macs': 500, 'params': 50,
                    'epochs': 3, 'wall_time_s': 1.0}]}
  (workdir / 'results_scratch.json').write_text(json.dumps(snap))


def test_without_matplotlib_the_tables_are_written_and_one_line_says_plots_were_skipped(
    tmp_path, monkeypatch, capsys):
  root = tmp_path / 'root'
  for seed in range(2):
    _snapshot(root, 'random', seed, 0.5 + 0.01 * seed)
    _snapshot(root, 'taylor', seed, 0.6 + 0.01 * seed)
  monkeypatch.setitem(sys.modules, 'matplotlib', None)  # `import matplotlib` now fails
  names = report.build(str(root), str(tmp_path / 'out'))
  assert 'random_vs_criterion.md' in names
  assert not any(n.endswith('.png') for n in names)
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["plots skipped: matplotlib is not installed (pip install -e '.[plots]' "
                 "installs it)."]


def test_a_pipe_in_a_markdown_cell_is_escaped():
  from experiments import report
  text = report.markdown(['method', 'acc'], [['weight (global |w| 0.8)', 1.0]])
  assert text.splitlines()[2] == '| weight (global \\|w\\| 0.8) | 1.0 |'
