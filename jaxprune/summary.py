"""Prints a model's widths, MACs and params per group, and what a preset or saved widths prune.

  python -m jaxprune.summary --model=resnet56
  python -m jaxprune.summary --model=resnet56 --preset=resnet56_b
  python -m jaxprune.summary --model=vgg16 --widths_file=runs/x/prune.json --json

A widths file is JSON holding `{"widths": {group: width}}` (a saved prune record
with a `widths` key is fine; groups not named keep their width) or
`{"masks": {group: [0/1, ...]}}`. `--json` prints one JSON object instead of the
table. A wrong value prints one sentence to stderr and exits with status 2.

A layer's MACs and params are counted under the group of its output channels;
a layer whose output width is fixed (a DenseNet growth conv, the classifier)
under the group it reads; a layer that follows no group (a fixed stem) under
'(fixed)'. The rows therefore add up to the totals.
"""

import json
import math
import sys
from typing import Mapping

from absl import app, flags, logging

from jaxprune import models
from jaxprune.prune import flops, select, shrink, structure
from jaxprune.errors import ConfigError, choose

FIXED = '(fixed)'

FLAGS = flags.FLAGS
flags.DEFINE_string('model', None, f"model to summarise: {', '.join(models.MODELS)}.")
flags.DEFINE_integer('image_size', 32, 'input height and width in pixels.', lower_bound=1)
flags.DEFINE_integer('num_classes', 10, 'number of classes of the classifier.', lower_bound=1)
flags.DEFINE_string('preset', None,
                    f"Li et al. preset to apply: {', '.join(select.PRESETS)}.")
flags.DEFINE_string('widths_file', None,
                    'JSON file with {"widths": {...}} (e.g. a prune record) or {"masks": {...}}.')
flags.DEFINE_bool('json', False, 'print one JSON object instead of a table.')


def human(n: float) -> str:
  """313201664 -> '313.2M', 853018 -> '0.85M', 1858 -> '1.86K'."""
  for unit, scale in (('G', 1e9), ('M', 1e5), ('K', 1e3)):
    if abs(n) >= scale:
      value = n / (1e6 if unit == 'M' else scale)
      return f"{value:.2f}{unit}" if abs(value) < 100 else f"{value:.1f}{unit}"
  return str(int(n))


def per_group(struct: structure.Structure, widths: Mapping[str, int]) -> dict[str, flops.Cost]:
  """MACs and params attributed to each group (see the module docstring); sums to the totals."""
  layers = {}
  for key, tags in struct.axes.items():
    if key[0] == 'params':
      layers.setdefault(key[1:-1], []).append((key, tags))
  macs = {g: 0 for g in list(struct.widths) + [FIXED]}
  params = dict(macs)
  for leaves in layers.values():
    # The kernel (or BN scale) decides for the whole layer, so a bias goes with its kernel.
    _, tags = max(leaves, key=lambda leaf: len(leaf[1]))
    tagged = [t for t in tags if t is not None]
    owner = tags[-1] if tags[-1] is not None else (tagged[-1] if tagged else FIXED)
    for key, tags in leaves:
      size = math.prod(widths[t] if t is not None else s
                       for s, t in zip(struct.shapes[key], tags))
      params[owner] += size
      macs[owner] += size * struct.positions.get(key, 0)
  if not macs[FIXED] and not params[FIXED]:
    del macs[FIXED], params[FIXED]
  return {g: flops.Cost(macs=macs[g], params=params[g]) for g in macs}


def load_widths(path: str, struct: structure.Structure) -> dict[str, int]:
  """Full widths from a JSON widths file or masks file (see the module docstring)."""
  try:
    with open(path) as f:
      record = json.load(f)
  except OSError as e:
    raise ConfigError(f"cannot read widths file {path!r}: {e.strerror or e}.") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"widths file {path!r} is not valid JSON ({e.msg} at line {e.lineno}).") \
        from None
  if not isinstance(record, dict) or not ('widths' in record or 'masks' in record):
    raise ConfigError(f"widths file {path!r} must be a JSON object with a 'widths' or a "
                      "'masks' key.")
  widths = dict(struct.widths)
  if 'widths' in record:
    given = record['widths']
    if not isinstance(given, dict):
      raise ConfigError(f"'widths' in {path!r} must map group names to widths.")
    unknown = [g for g in given if g not in struct.widths]
    if unknown:
      raise ConfigError(f"widths file {path!r} names unknown groups {unknown}; the groups are "
                        f"{list(struct.widths)}.")
    bad = {g: w for g, w in given.items()
           if isinstance(w, bool) or not isinstance(w, int) or w < 1}
    if bad:
      raise ConfigError(f"widths in {path!r} must be positive integers, got {bad}.")
    widths.update(given)
  else:
    given = record['masks']
    if not isinstance(given, dict):
      raise ConfigError(f"'masks' in {path!r} must map group names to lists of 0/1.")
    try:
      kept = shrink.kept_indices(struct, given)
    except ValueError as e:
      raise ConfigError(f"masks in {path!r}: {e}") from None
    widths.update({g: int(k.size) for g, k in kept.items()})
  return widths


def _cost_dict(cost: flops.Cost) -> dict[str, int]:
  return {'macs': cost.macs, 'params': cost.params}


def _reduction(before: int, after: int) -> float:
  return 100.0 * (before - after) / before if before else 0.0


def summarize(model: str, image_size: int = 32, num_classes: int = 10,
              preset: str | None = None, widths_file: str | None = None) -> dict:
  """The summary as a JSON-ready dict: totals, widths and per-group costs, pruned if asked."""
  if preset is not None and widths_file is not None:
    raise ConfigError("give either --preset or --widths_file, not both.")
  if preset is not None:
    choose('preset', preset, select.PRESETS)  # before the seconds that deriving takes
  struct = structure.derive(models.build(model, num_classes=num_classes),
                            (image_size, image_size, 3))
  total = flops.count(struct)
  out = {
      'model': model, 'image_size': image_size, 'num_classes': num_classes,
      'macs': total.macs, 'params': total.params, 'widths': dict(struct.widths),
      'prunable': list(struct.prunable),
      'groups': {g: _cost_dict(c) for g, c in per_group(struct, struct.widths).items()},
  }
  if preset is None and widths_file is None:
    return out
  if preset is not None:
    widths, source = select.preset_widths(preset, struct), f'preset {preset}'
  else:
    widths, source = load_widths(widths_file, struct), widths_file
  pruned = flops.count(struct, widths)
  out['pruned'] = {
      'source': source, 'macs': pruned.macs, 'params': pruned.params, 'widths': widths,
      'groups': {g: _cost_dict(c) for g, c in per_group(struct, widths).items()},
  }
  out['reduction_percent'] = {'macs': _reduction(total.macs, pruned.macs),
                              'params': _reduction(total.params, pruned.params)}
  return out


def format_summary(summary: dict) -> str:
  """The summary as an aligned text table with totals."""
  pruned = summary.get('pruned')
  size = summary['image_size']
  lines = [f"{summary['model']} at {size}x{size}x3, {summary['num_classes']} classes"
           + (f"; pruned by {pruned['source']}" if pruned else '')]
  header = ['group', 'prunable', 'width']
  if pruned:
    header += ['pruned', 'MACs', 'pruned MACs', 'params', 'pruned params']
  else:
    header += ['MACs', 'params']
  rows = []
  for g, cost in summary['groups'].items():
    width = summary['widths'].get(g)
    row = [g, 'yes' if g in summary['prunable'] else '', '' if width is None else str(width)]
    if pruned:
      after = pruned['groups'][g]
      new = pruned['widths'].get(g)
      row += ['' if new is None else str(new), human(cost['macs']), human(after['macs']),
              human(cost['params']), human(after['params'])]
    else:
      row += [human(cost['macs']), human(cost['params'])]
    rows.append(row)
  if pruned:
    rows.append(['total', '', '', '', human(summary['macs']), human(pruned['macs']),
                 human(summary['params']), human(pruned['params'])])
  else:
    rows.append(['total', '', '', human(summary['macs']), human(summary['params'])])
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

  def fmt(row):
    return '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(row, widths)))

  lines += [fmt(header)] + [fmt(r) for r in rows]
  lines.append(f"MACs {human(summary['macs'])} ({summary['macs']:,}), "
               f"params {human(summary['params'])} ({summary['params']:,})")
  if pruned:
    red = summary['reduction_percent']
    lines.append(f"pruned: MACs {human(pruned['macs'])} ({pruned['macs']:,}), "
                 f"-{red['macs']:.1f}%; params {human(pruned['params'])} "
                 f"({pruned['params']:,}), -{red['params']:.1f}%")
  return '\n'.join(lines)


def main(argv):
  if not FLAGS['verbosity'].present:
    # JAX logs its backend search at INFO; the tool's stderr is for its one error sentence.
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    print(f"unexpected arguments {argv[1:]}; all options are --flags.", file=sys.stderr)
    sys.exit(2)
  try:
    if FLAGS.model is None:
      raise ConfigError(f"--model is required; choose one of: {', '.join(models.MODELS)}.")
    summary = summarize(FLAGS.model, FLAGS.image_size, FLAGS.num_classes, FLAGS.preset,
                        FLAGS.widths_file)
  except ConfigError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
  print(json.dumps(summary) if FLAGS.json else format_summary(summary))


if __name__ == '__main__':
  app.run(main)
