"""Prints a model's widths, MACs and params per group, and what a preset or saved widths prune.

  python -m jaxprune.summary --model=resnet20
  python -m jaxprune.summary --model=vgg16 --dataset=cifar10
  python -m jaxprune.summary --model=resnet56 --dataset=cifar10 --preset=resnet56_b
  python -m jaxprune.summary --model=tiny --widths_file=runs/x/prune/record.json --json

The model is counted at the images and classes of `--dataset` (default digits, as for
launch.py: 8x8x1, 10 classes; cifar10 and cifar100 32x32x3, imagenet2012 224x224x3 and 1000
classes), which nothing downloads: TFDS's metadata for CIFAR, constants for ImageNet.

A widths file is JSON holding `{"widths": {group: width}}` (a run's prune record,
`WORKDIR/prune/record.json`, has that key; groups not named keep their width) or
`{"masks": {group: [0/1, ...]}}`. `--json` prints one JSON object instead of the
table. A wrong value prints one sentence to stderr and exits with status 1.

A layer's MACs and params count under the group of its output channels; a layer of fixed
output width (a DenseNet growth conv, the classifier) under the group it reads; a layer that
follows no group (a fixed stem) under '(fixed)'. The rows therefore add up to the totals.
"""

import json
import math
from typing import Mapping

from absl import app, flags, logging

from jaxprune import data, errors, models
from jaxprune.errors import ConfigError
from jaxprune.prune import flops, program, select, shrink, structure
from jaxprune.pipeline import config

FIXED = '(fixed)'

# Datasets read through TFDS: their builder's metadata has the image shape and classes.
_TFDS = ('cifar10', 'cifar100')
# Datasets counted at constants: ImageNet's images vary in size, and its models (and the
# papers' MACs) take 224x224 crops. {dataset: (image shape, classes)}.
IMAGE_SHAPES = {'imagenet2012': ((224, 224, 3), 1000)}

FLAGS = flags.FLAGS
flags.DEFINE_string('model', None, f"model to summarise: {', '.join(models.MODELS)}, or "
                    'your own as package.module:factory (as for launch.py).')
flags.DEFINE_string('dataset', 'digits', 'dataset whose image shape and classes the model is '
                    f"counted at: {', '.join({**data.DATASETS, **IMAGE_SHAPES})} (as for "
                    'launch.py).')
flags.DEFINE_string('data_path', None, 'the .npz file of --dataset=npz.')
flags.DEFINE_string('preset', None, f"Li et al. preset to apply: {', '.join(select.PRESETS)}.")
flags.DEFINE_string('widths_file', None, 'JSON file with {"widths": {...}} (e.g. a run\'s '
                    'prune/record.json) or {"masks": {...}}.')
flags.DEFINE_float('width_multiplier', 1.0, "every default width times this, as launch.py's "
                   '--width_multiplier builds the model.')
flags.DEFINE_bool('json', False, 'print one JSON object instead of a table.')


def human(n: float) -> str:
  """313201664 -> '313.2M', 853018 -> '0.85M', 1858 -> '1.86K'."""
  for unit, scale in (('G', 1e9), ('M', 1e5), ('K', 1e3)):
    if abs(n) >= scale:
      value = n / (1e6 if unit == 'M' else scale)
      return f"{value:.2f}{unit}" if abs(value) < 100 else f"{value:.1f}{unit}"
  return str(int(n))


def per_group(struct: structure.Structure, widths: Mapping[str, int]) -> dict[str, dict]:
  """{'macs', 'params'} attributed to each group (module docstring); sums to the totals."""
  layers = {}
  for key, tags in struct.axes.items():
    if key[0] == 'params':
      layers.setdefault(key[1:-1], []).append((key, tags))
  costs = {g: {'macs': 0, 'params': 0} for g in [*struct.widths, FIXED]}
  for leaves in layers.values():
    # The kernel (or BN scale) decides for the whole layer, so a bias goes with its kernel.
    _, tags = max(leaves, key=lambda leaf: len(leaf[1]))
    owner = next((t for t in reversed(tags) if t is not None), FIXED)
    for key, tags in leaves:
      size = math.prod(widths[t] if t is not None else s for s, t in zip(struct.shapes[key], tags))
      costs[owner]['params'] += size
      costs[owner]['macs'] += size * struct.positions.get(key, 0)
  if costs[FIXED] == {'macs': 0, 'params': 0}:
    del costs[FIXED]
  return costs


def load_widths(path: str, struct: structure.Structure) -> dict[str, int]:
  """Full widths from a JSON widths file or masks file (see the module docstring)."""
  where = f'widths_file {path!r}'
  fail = lambda message: ConfigError(message, settings=('widths_file',))
  try:
    with open(path) as f:
      record = json.load(f)
  except OSError as e:
    raise fail(f"cannot read {where}: {e.strerror or e}.") from None
  except json.JSONDecodeError as e:
    raise fail(f"{where} is not valid JSON ({e.msg} at line {e.lineno}).") from None
  if not isinstance(record, dict) or not ('widths' in record or 'masks' in record):
    raise fail(f"{where} must hold a JSON object with a 'widths' or a 'masks' key.")
  widths = dict(struct.widths)
  if 'widths' in record:
    given = record['widths']
    if not isinstance(given, dict):
      raise fail(f"'widths' in {where} must map group names to widths.")
    unknown = [g for g in given if g not in struct.widths]
    if unknown:
      raise fail(f"{where} names unknown groups {unknown}; the groups are {list(struct.widths)}.")
    bad = {g: w for g, w in given.items() if isinstance(w, bool) or not isinstance(w, int) or w < 1}
    if bad:
      raise fail(f"widths in {where} must be positive integers, got {bad}.")
    widths.update(given)
  else:
    given = record['masks']
    if not isinstance(given, dict):
      raise fail(f"'masks' in {where} must map group names to lists of 0/1.")
    try:
      kept = shrink.kept_indices(struct, given)
    except ValueError as e:  # the checks a selection's masks pass, here on a user's file
      raise fail(f"masks in {where}: {e}") from None
    widths.update({g: int(k.size) for g, k in kept.items()})
  return widths


def dataset_shape(name: str, data_path: str | None = None) -> tuple[tuple[int, ...], int]:
  """(image shape, number of classes) of the dataset `name` (a key of `data.DATASETS` or
  `IMAGE_SHAPES`); digits and npz are loaded (an npz's shape is only in its file)."""
  errors.choose('dataset', name, {**data.DATASETS, **IMAGE_SHAPES}, setting='dataset')
  if data_path is not None and (name in _TFDS or name in IMAGE_SHAPES):
    raise ConfigError(f"data_path is for dataset=npz, not dataset={name}.",
                      settings=('data_path', 'dataset'))
  if name in IMAGE_SHAPES:
    return IMAGE_SHAPES[name]
  if name in _TFDS:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    features = tfds.builder(name).info.features
    return tuple(features['image'].shape), int(features['label'].num_classes)
  loaded = data.load(name, data_path=data_path)
  return loaded.image_shape, loaded.num_classes


def _reduction(before: int, after: int) -> float:
  return 100.0 * (before - after) / before if before else 0.0


def summarize(model: str, dataset: str = 'digits', data_path: str | None = None,
              preset: str | None = None, widths_file: str | None = None,
              width_multiplier: float = 1.0) -> dict:
  """The summary as a JSON-ready dict: totals, widths and per-group costs, pruned if asked,
  of the model counted at `dataset`'s image shape and classes (`dataset_shape`)."""
  if preset is not None and widths_file is not None:
    raise ConfigError("give either preset or widths_file, not both.",
                      settings=('preset', 'widths_file'))
  config.BY_NAME['model'].check(model)
  if models.own.is_own(model):
    models.own.load_factory(model)
  if preset is not None:
    # Before the seconds that deriving takes.
    errors.choose('preset', preset, select.PRESETS, setting='preset')
  config.BY_NAME['width_multiplier'].check(width_multiplier)
  image_shape, num_classes = dataset_shape(dataset, data_path)
  try:
    built = models.build(model, num_classes=num_classes, width_multiplier=width_multiplier,
                         image_shape=image_shape)
    derive = program.derive_checked if isinstance(built, models.OwnModel) else program.derive
    struct = derive(built, image_shape).structure
  except ConfigError as e:  # e.g. a VGG's five poolings on 8x8 digits
    shape = 'x'.join(map(str, image_shape))
    raise ConfigError(f"model={model} cannot take the {shape} images of dataset={dataset}: "
                      f"{e}", settings=('model', 'dataset', *e.settings)) from None
  total = flops.count(struct)
  out = {'model': model, 'width_multiplier': width_multiplier, 'dataset': dataset,
         'image_shape': list(image_shape), 'num_classes': num_classes, 'macs': total.macs,
         'params': total.params, 'widths': dict(struct.widths), 'prunable': list(struct.prunable),
         'groups': per_group(struct, struct.widths)}
  if preset is None and widths_file is None:
    return out
  if preset is not None:
    widths, source = select.preset_widths(preset, struct), f'preset {preset}'
  else:
    widths, source = load_widths(widths_file, struct), widths_file
  pruned = flops.count(struct, widths)
  out['pruned'] = {'source': source, 'macs': pruned.macs, 'params': pruned.params,
                   'widths': widths, 'groups': per_group(struct, widths)}
  out['reduction_percent'] = {'macs': _reduction(total.macs, pruned.macs),
                              'params': _reduction(total.params, pruned.params)}
  return out


def format_summary(summary: dict) -> str:
  """The summary as an aligned text table with totals."""
  pruned = summary.get('pruned')
  shape = 'x'.join(map(str, summary['image_shape']))
  multiplier = summary.get('width_multiplier', 1.0)
  scaled = f" x{multiplier:g} widths" if multiplier != 1.0 else ''
  lines = [f"{summary['model']}{scaled} at {shape} ({summary['dataset']}), "
           f"{summary['num_classes']} classes" +
           (f"; pruned by {pruned['source']}" if pruned else '')]
  header = ['group', 'prunable', 'width'] + (['pruned', 'MACs', 'pruned MACs', 'params',
                                              'pruned params'] if pruned else ['MACs', 'params'])

  def costs(before, after):  # MACs, then params: before, and after pruning if pruned
    return [human(c[m]) for m in ('macs', 'params') for c in (before, after) if c is not None]

  rows = []
  for g, cost in summary['groups'].items():
    row = [g, 'yes' if g in summary['prunable'] else '', str(summary['widths'].get(g, ''))]
    row += [str(pruned['widths'].get(g, ''))] if pruned else []
    rows.append(row + costs(cost, pruned and pruned['groups'][g]))
  rows.append(['total', '', ''] + ([''] if pruned else []) + costs(summary, pruned))
  widths = [max(map(len, column)) for column in zip(header, *rows)]
  for row in [header] + rows:
    cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
    lines.append('  '.join(cells))
  lines.append(f"MACs {human(summary['macs'])} ({summary['macs']:,}), "
               f"params {human(summary['params'])} ({summary['params']:,})")
  if pruned:
    red = summary['reduction_percent']
    lines.append(f"pruned: MACs {human(pruned['macs'])} ({pruned['macs']:,}), -{red['macs']:.1f}%; "
                 f"params {human(pruned['params'])} ({pruned['params']:,}), -{red['params']:.1f}%")
  return '\n'.join(lines)


def main(argv):
  if not FLAGS['verbosity'].present:
    # JAX logs its backend search at INFO; the tool's stderr is for its one error sentence.
    logging.set_verbosity(logging.WARNING)
  with errors.exit_on_user_error():
    if len(argv) > 1:
      raise ConfigError(f"unexpected arguments {argv[1:]}; all options are flags.")
    if FLAGS.model is None:
      raise ConfigError(f"model is required; choose one of: {', '.join(models.MODELS)}.",
                        settings=('model',))
    summary = summarize(FLAGS.model, FLAGS.dataset, FLAGS.data_path, FLAGS.preset,
                        FLAGS.widths_file, FLAGS.width_multiplier)
  print(json.dumps(summary) if FLAGS.json else format_summary(summary))


if __name__ == '__main__':
  app.run(main, flags_parser=config.parse_command_line)
