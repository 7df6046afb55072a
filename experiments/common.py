"""The shared runner of the papers' experiments: an experiment is a list of named runs.

Each run is one `pipeline.Config` for one regime. Runs of the same pruned network
(same criterion, selection, budget and seed) share one work directory under
`--root`, so the prune stage is computed once and every regime gets its own stage
directory; runs of the same model x seed (and baseline settings) share one
baseline through `baseline_dir` under `ROOT/baselines/`. After a run the runner
snapshots the pipeline's results (whose `results.json` holds every regime finished
in the work directory) into `WORKDIR/results_<regime>.json`, with the experiment's name
and the run's labels added; `experiments.report` reads only those snapshots (and
`agreement.json` of criteria_vs_oracle). A run whose snapshot exists is skipped
without loading anything; an interrupted run resumes inside the pipeline.

Two scales: `mini` (the CIFAR-10 sample npz on a CPU, small models and epochs,
>= 3 seeds) and `full` (CIFAR-10/100 through TFDS with the papers' budgets).
"""

import dataclasses
import hashlib
import json
import os
import sys
import time
import types
from typing import Any, Callable, Mapping, Sequence

SCALES = ('mini', 'midi', 'full')

# [R]'s CIFAR budgets: SGD lr 0.1, batch 64, 160 epochs, fine-tune 40 epochs at 1e-3, 5 runs.
FULL = dict(dataset='cifar10', epochs=160, batch_size=64, lr=0.1, weight_decay=1e-4,
            finetune_epochs=40, finetune_lr=1e-3)
FULL_SEEDS = (0, 1, 2, 3, 4)
# A 2-core CPU budget: a fixed random 1,000-image subset of the 10,000-image sample (about
# 100 per class), batch 32, 8 epochs (248 steps), three seeds; every experiment's mini model
# is resnet8 unless it needs another family, so most experiments share their baselines.
# scratch_b is capped at 2x the epochs: uncapped, 30% of the MACs would train 26 epochs.
MINI = dict(dataset='npz', epochs=8, batch_size=32, lr=0.1, weight_decay=1e-4,
            finetune_epochs=3, finetune_lr=1e-3, max_train=1000, scratch_b_cap=2.0)
MINI_SEEDS = (0, 1, 2)
# Real CIFAR-10 on a 2-core CPU: the full decoded training set (50,000 images) and test set
# (10,000), [R]'s schedule shortened to 15 epochs (x0.1 at 50 % and 75 %), batch 64, on
# VGG-11 at half width (about an hour per pruned network's regimes); scratch_b uncapped.
MIDI = dict(dataset='npz', model='vgg11', width_multiplier=0.5, epochs=15, batch_size=64,
            lr=0.1, weight_decay=1e-4, finetune_epochs=3, finetune_lr=1e-3)
MIDI_SEEDS = (0, 1, 2)
BUDGETS = {'mini': MINI, 'midi': MIDI, 'full': FULL}
SEEDS = {'mini': MINI_SEEDS, 'midi': MIDI_SEEDS, 'full': FULL_SEEDS}


@dataclasses.dataclass(frozen=True)
class Run:
  """One pipeline call: `config` (one regime) plus the labels the report groups by."""
  name: str                 # unique within the experiment, e.g. 'taylor/macs0.50/s0/scratch'
  config: 'object'          # pipeline.Config
  labels: dict

  @property
  def snapshot(self) -> str:
    return os.path.join(self.config.workdir, f'results_{self.config.regime}.json')


def files_under(root: str):
  """(its directory relative to `root`, '.' for the root itself; its path) of every file under
  `root` (local or gs://), in sorted order; none if `root` does not exist."""
  from etils import epath
  top = epath.Path(root)
  if not top.exists():
    return
  # gs:// walks name their directories without the scheme: compare without it.
  base = str(top).split('://', 1)[-1].rstrip('/')
  for directory, _, names in sorted(top.walk(), key=lambda w: str(w[0])):
    where = str(directory).split('://', 1)[-1][len(base):].lstrip('/') or '.'
    folder = top if where == '.' else top / where
    for name in sorted(names):
      yield where, folder / name


def is_result_file(name: str) -> bool:
  """Whether a file of this name under a root is one `experiments.report` reads: a run's
  snapshot, criteria_vs_oracle's agreement.json, latency.json or a pruning curve."""
  return ((name.startswith('results_') and name.endswith('.json'))
          or name in ('agreement.json', 'latency.json', 'pruning_curve.jsonl'))


def copy_results(source: str, target: str, replace: bool = True) -> int:
  """Copies every result file under `source` to the same relative path under `target` (a copy
  already there is replaced only if `replace`); returns how many were copied."""
  return _copy(source, target, lambda where, name: is_result_file(name), replace)


def _copy(source: str, target: str, chosen: Callable[[str, str], bool],
          replace: bool = True) -> int:
  """Copies each file under `source` for which `chosen(its directory, its name)` holds to the
  same relative path under `target`; returns how many were copied."""
  from etils import epath
  copied = 0
  for where, path in files_under(source):
    if chosen(where, path.name):
      copy = epath.Path(target) / where / path.name
      if replace or not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
        copied += 1
  return copied


# What of a finished baseline `--archive_baselines` keeps: its final variables and records.
# Its initial variables are made again from the seed, and its training checkpoints are not
# needed once it is done (result.json, copied last, is the pipeline's "done" marker).
BASELINE_RECORDS = ('stage_config.json', 'metrics.jsonl', 'result.json')
# Orbax's commit marker names the absolute path it was first written to; only its presence
# counts (on gs://), so the copy's says no more than that.
ORBAX_COMMIT_MARKER = 'commit_success.txt'


def _copy_baseline(source, target) -> None:
  """Copies a finished baseline's final variables, then its records (result.json last)."""
  from jaxprune.train.checkpoint import FINAL
  _copy(str(source / FINAL), str(target / FINAL),
        lambda where, name: name != ORBAX_COMMIT_MARKER)
  for where, path in files_under(str(source / FINAL)):
    if path.name == ORBAX_COMMIT_MARKER:
      (target / FINAL / where / path.name).write_text('Checkpoint commit was successful.')
  for name in BASELINE_RECORDS:
    if (source / name).exists():
      (target / name).write_bytes((source / name).read_bytes())


@dataclasses.dataclass(frozen=True)
class Archive:
  """`--archive`: a directory (e.g. the results folder of a repository) that keeps the result
  files of `root` at the same relative paths, without the checkpoints; with `baselines`, also
  each finished baseline's final variables and records. `restore` copies the archived files
  a fresh root lacks into it, so their runs are skipped and their baselines read instead of
  trained, and then every result file of the root into the archive; `keep` copies those of
  one directory as its run finishes. A study whose root is lost (a replaced machine)
  continues from the archive alone."""
  root: str
  path: str | None
  baselines: bool = False

  def __post_init__(self):
    if self.baselines and not self.path:
      from jaxprune.errors import ConfigError
      raise ConfigError('--archive_baselines keeps the baselines in the --archive directory; '
                        'give --archive=DIR too.', settings=('archive_baselines', 'archive'))

  def restore(self) -> None:
    if self.path:
      restored = copy_results(self.path, self.root, replace=False)
      kept = copy_results(self.root, self.path)
      print(f'--archive {self.path}: {restored} result files restored into --root, '
            f'{kept} kept from it.')
      baselines = self._restore_baselines()
      if baselines:
        print(f'--archive {self.path}: {baselines} finished baselines restored into --root.')

  def keep(self, directory: str) -> None:
    if self.path:
      from etils import epath
      copy_results(directory, str(epath.Path(self.path) / self._relative(directory)))

  def keep_baseline(self, stage: str) -> None:
    """Keeps the finished baseline in `stage` (a directory under the root), once."""
    from etils import epath
    from jaxprune.train.checkpoint import RESULT
    if not (self.path and self.baselines):
      return
    source = epath.Path(stage)
    target = epath.Path(self.path) / self._relative(stage)
    if (target / RESULT).exists() or not (source / RESULT).exists():
      return
    _copy_baseline(source, target)

  def _restore_baselines(self) -> int:
    """Copies each archived finished baseline the root lacks into it; returns how many."""
    from etils import epath
    from jaxprune.train.checkpoint import RESULT
    if not self.baselines or not (epath.Path(self.path) / 'baselines').exists():
      return 0
    restored = 0
    for archived in sorted((epath.Path(self.path) / 'baselines').iterdir()):
      stage = epath.Path(self.root) / 'baselines' / archived.name
      if (archived / RESULT).exists() and not (stage / RESULT).exists():
        _copy_baseline(archived, stage)
        restored += 1
    return restored

  def _relative(self, directory: str) -> str:
    return os.path.relpath(str(directory), str(self.root))


# The settings an experiment's command line may override; help and types come from their
# declaration (jaxprune.pipeline.config.SETTINGS).
OVERRIDABLE = ('model', 'width_multiplier', 'dataset', 'data_path', 'data_dir', 'epochs',
               'batch_size', 'lr', 'max_train', 'finetune_epochs', 'compilation_cache_dir')


_SCALE_HELP = {
    'mini': 'a 1,000-image subset of a CIFAR-10 npz (--data_path, e.g. the sample) on a CPU',
    'midi': 'the full CIFAR-10 as an npz (--data_path; 50,000 training images) on a CPU, '
            '15 epochs of VGG-11 at half width',
    'full': "CIFAR through TFDS with the papers' budgets",
}


def define_flags(flag_values, defaults: dict | None = None,
                 scales: Sequence[str] = ('mini', 'full')) -> None:
  """Defines the absl flags every experiment takes on `flag_values`; `defaults` ({scale:
  settings}) shows its own in --help, `scales` are the scales the experiment plans (without
  mini, --scale must be given)."""
  from absl import flags
  flags.DEFINE_enum('scale', 'mini' if 'mini' in scales else None, scales,
                    '; '.join(f'{s}: {_SCALE_HELP[s]}' for s in scales) + '.',
                    flag_values=flag_values)
  if 'mini' not in scales:
    flags.mark_flag_as_required('scale', flag_values=flag_values)
  flags.DEFINE_string('root', 'runs/experiments',
                      'Root of the work directories (local path or gs://).',
                      flag_values=flag_values)
  flags.DEFINE_string('seeds', None, 'Comma-separated seeds. Default: ' + ', '.join(
      f"{','.join(map(str, SEEDS[s]))} ({s})" for s in scales) + '.', flag_values=flag_values)
  shown = {}
  for name in OVERRIDABLE:
    values = {scale: (defaults or {}).get(scale, {}).get(name, BUDGETS[scale].get(name))
              for scale in scales}
    shown[name] = ', '.join(f'{v} ({scale})' for scale, v in values.items() if v is not None)
  define_setting_flags(flag_values, shown)
  flags.DEFINE_string('archive', None, 'A directory that keeps every result file of --root '
                      '(snapshots, agreement.json, latency.json, pruning curves; no checkpoints) '
                      'at the same path, copied as each run finishes: runs whose files it holds '
                      'are skipped, so an empty --root (a new machine) continues from it. '
                      '`experiments.report --root=ARCHIVE` builds the tables from it.',
                      flag_values=flag_values)
  flags.DEFINE_bool('archive_baselines', False, 'With --archive, also keep each finished '
                    "baseline's final variables and records there (about 4 bytes per parameter "
                    'of the model, e.g. 9 MB for midi), so a new machine reads it instead of '
                    'training it again; the training checkpoints are never kept.',
                    flag_values=flag_values)
  flags.DEFINE_bool('dry_run', False, 'Print the planned runs and their budgets; run nothing.',
                    flag_values=flag_values)


def define_setting_flags(flag_values, shown: Mapping[str, str]) -> None:
  """Defines the flags of the settings named in `shown` as launch.py does
  (`config.define_flags`), but unset by default, meaning "the experiment's value"; `shown`
  says in --help what that value is ('' says nothing)."""
  from jaxprune.pipeline import config
  config.define_flags(flag_values, names=tuple(shown))
  for name, text in shown.items():
    flag_values.set_default(name, None)
    if text:
      flag_values[name].help += f' Default: {text}.'


def define_list_flag(flag_values, flag: str, name: str,
                     default: Sequence | Mapping[str, Sequence]) -> None:
  """Defines `--FLAG`, comma-separated values of setting `name` (read by `config.parse_list`).

  `default` is the list, or {scale: list} where the default depends on the experiment's
  scale; then the flag is unset by default and --help shows every scale's."""
  from absl import flags
  from jaxprune.pipeline import config
  setting = config.BY_NAME[name]
  text = f'Comma-separated values of {name}: {setting.help}'
  if setting.choices:
    text += f" Each one of: {', '.join(setting.allowed())}."
  if isinstance(default, Mapping):
    value = None
    text += ' Default: ' + '; '.join(f"{','.join(map(str, v))} ({k})"
                                     for k, v in default.items()) + '.'
  else:
    value = ','.join(map(str, default))
  flags.DEFINE_string(flag, value, text, flag_values=flag_values)


def parse(flag_values, argv: Sequence[str] | None, program: str,
          description: str) -> types.SimpleNamespace:
  """The values of the flags defined on `flag_values`, parsed from `argv` (default:
  sys.argv[1:]), as attributes. --help prints `description` and every flag, then exits 0; a
  bad flag raises ConfigError (one sentence)."""
  from absl import flags
  from jaxprune.errors import ConfigError
  from jaxprune.pipeline import config
  argv = sys.argv[1:] if argv is None else list(argv)
  if any(arg in config._HELP_FLAGS for arg in argv):  # launch.py's spellings
    print(f'usage: {program} [--flag=value ...]\n\n{description.strip()}\n\nflags:\n'
          f'{flag_values.get_help()}')
    raise SystemExit(0)
  try:
    unparsed = flag_values([program, *argv])
  except flags.Error as error:
    message = str(error)
    raise ConfigError(message if message.endswith('.') else f'{message}.') from None
  except UnicodeDecodeError as error:
    raise ConfigError(f'--flagfile is not a text file of flags (byte {error.start} is not '
                      'UTF-8).') from None
  if len(unparsed) > 1:
    raise ConfigError(f'unexpected arguments {unparsed[1:]}; every setting is a --flag (see '
                      '--help).')
  return types.SimpleNamespace(**flag_values.flag_values_dict())


def seeds_of(args) -> tuple[int, ...]:
  if args.seeds:
    entries = args.seeds.split(',')
    if not all(entry.strip().isdigit() for entry in entries):
      from jaxprune.errors import ConfigError
      raise ConfigError(f"--seeds {args.seeds!r} is not a comma-separated list of whole "
                        "numbers >= 0, e.g. 0,1,2.")
    return tuple(int(entry) for entry in entries)
  return SEEDS[args.scale]


def choices_of(text: str, flag: str, allowed: Sequence[str]) -> tuple[str, ...]:
  """The comma-separated names of `text`, each one of `allowed` (ConfigError otherwise)."""
  from jaxprune.errors import ConfigError
  names = tuple(name.strip() for name in text.split(',') if name.strip())
  unknown = [name for name in names if name not in allowed]
  if unknown or not names:
    raise ConfigError(f"{flag} {text!r} must be one or more of {', '.join(allowed)}, "
                      'comma-separated.', settings=(flag,))
  return names


def base_settings(args, **experiment_defaults) -> dict:
  """Config fields shared by every run: the scale's budget, the experiment's, then flags."""
  settings = dict(BUDGETS[args.scale])
  settings.update(experiment_defaults.get(args.scale, {}))
  for name in OVERRIDABLE:
    value = getattr(args, name, None)
    if value is not None:
      settings[name] = value
  if settings.get('dataset') == 'npz' and not settings.get('data_path'):
    from jaxprune.errors import ConfigError
    raise ConfigError(f'--scale={args.scale} trains on an .npz file (dataset npz): give '
                      '--data_path=FILE.npz, e.g. the CIFAR-10 sample.')
  if settings.get('dataset') != 'npz':
    settings.pop('data_path', None)
    if args.max_train is None:
      settings.pop('max_train', None)
  return settings


def baseline_dir(root: str, settings: dict) -> str:
  """One baseline per model x seed x baseline settings: the name shows model and seed, a hash
  the settings that differ from their defaults (so a setting added later, at its default,
  names the same baselines)."""
  from jaxprune import pipeline
  keys = pipeline.stage_settings(pipeline.make(**settings), 'baseline')
  changed = {k: v for k, v in keys.items() if v != pipeline.config.BY_NAME[k].default}
  digest = hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
  model = keys['model'].replace(':', '.')  # an own model's package.module:factory
  return os.path.join(root, 'baselines', f"{model}_s{keys['seed']}_{digest}")


def make_run(experiment: str, root: str, path: str, regime: str, labels: dict,
             **settings) -> Run:
  """A run in ROOT/EXPERIMENT/PATH (shared by its regimes) with a shared baseline."""
  from jaxprune import pipeline
  workdir = os.path.join(root, experiment, path)
  config = pipeline.make(workdir=workdir, regime=regime,
                         baseline_dir=baseline_dir(root, settings), **settings)
  pipeline.validate(config)
  return Run(name=f'{path}/{regime}', config=config,
             labels={'regime': regime, **labels, 'experiment': experiment})


def _budget(config) -> str:
  for name in ('target_macs', 'prune_ratio', 'preset'):
    value = getattr(config, name)
    if value is not None:
      return f'{name}={value}'
  return '-'


def _regime_epochs(config) -> str:
  if config.regime == 'finetune':
    return f'{config.finetune_epochs} (lr {config.finetune_lr:g})'
  if config.regime == 'scratch_b':
    cap = f', cap {config.scratch_b_cap:g}x' if config.scratch_b_cap else ''
    return f'{config.epochs} x MACs ratio{cap}'
  return str(config.epochs)


def _lr_schedule(config) -> str:
  if config.lr_schedule != 'step':
    return config.lr_schedule
  at = (f'epochs {config.lr_decay_epochs}' if config.lr_decay_epochs
        else '50% and 75% of the epochs')
  return f'step x{config.lr_decay_factor:g} at {at}'


def _init(config) -> str:
  shortcut = (f', {config.resnet_shortcut}'
              if config.resnet_shortcut != 'subsample' else '')
  return f'bn {config.bn_scale_init:g}, dense {config.dense_init}{shortcut}'


def _augmentation(config) -> str:
  from jaxprune import stream
  if stream.streams(config.dataset, config.input) and config.dataset in stream.STREAMED:
    return (f'streamed, random-resized crops of {config.image_size} and flips, tested on '
            'centre crops')
  return f'crop padding {config.pad_mode}'


def describe(runs: Sequence[Run]) -> str:
  """The dry-run listing: one line per run with everything its budget depends on."""
  columns = ('run', 'architecture', 'model', 'init', 'data', 'criterion', 'selection', 'budget',
             'schedule', 'regime', 'baseline ep', 'regime ep', 'seed')
  rows = []
  for run in runs:
    c = run.config
    data = c.dataset + (f' ({c.max_train} train)' if c.max_train else '')
    model = c.model + (f' x{c.width_multiplier:g}' if c.width_multiplier != 1.0 else '')
    selection = c.selection + (' (weights)' if c.granularity == 'weight' else '')
    if c.width_profile != 0 or c.selection == 'random_widths':
      selection += f' #{c.width_profile}'
    if c.kept_channels != 'criterion':
      selection += f', {c.kept_channels} channels'
    rows.append((run.name, run.labels.get('architecture', '-'), model, _init(c), data,
                 c.criterion, selection, _budget(c), c.schedule, c.regime, str(c.epochs),
                 _regime_epochs(c), str(c.seed)))
  widths = [max(len(columns[i]), *(len(r[i]) for r in rows)) if rows else len(columns[i])
            for i in range(len(columns))]
  lines = ['  '.join(h.ljust(w) for h, w in zip(columns, widths))]
  lines.append('-' * len(lines[0]))
  lines += ['  '.join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
  baselines = sorted({r.config.baseline_dir for r in runs})
  workdirs = sorted({r.config.workdir for r in runs})
  c0 = runs[0].config if runs else None
  if c0 is not None:
    lines.append(f'{len(runs)} runs in {len(workdirs)} work directories, {len(baselines)} '
                 f'shared baselines; batch {c0.batch_size}, lr {c0.lr:g}, wd {c0.weight_decay:g}, '
                 f'lr schedule {_lr_schedule(c0)}, {_augmentation(c0)}.')
    finetuned = [r.config for r in runs if r.config.regime == 'finetune'
                 or r.config.schedule == 'iterative']
    if finetuned:
      f = finetuned[0]
      lines.append(f'Fine-tuning: lr {f.finetune_lr:g} (constant), batch '
                   f'{f.finetune_batch_size or f.batch_size}, wd {f.weight_decay:g}.')
    lottery = sorted({(r.labels.get('method', ''), r.config.lottery_style) for r in runs
                      if r.config.regime == 'lottery'})
    if lottery:
      lines.append('Lottery: ' + ', '.join(f'{style} ({method})' if method else style
                                           for method, style in lottery) + '.')
    reduced = [r.config for r in runs if r.config.regime == 'reduced']
    if reduced:
      lines.append(f'Reduced networks matched on {reduced[0].reduced_match}.')
  return '\n'.join(lines)


def _units(run: Run, seen_baselines: set) -> float:
  """A rough cost of a run in epochs, for the ETA (a baseline counts once)."""
  c = run.config
  units = {'finetune': c.finetune_epochs, 'scratch_b': 2 * c.epochs}.get(c.regime, c.epochs)
  if c.baseline_dir not in seen_baselines:
    seen_baselines.add(c.baseline_dir)
    if not os.path.exists(os.path.join(c.baseline_dir, 'result.json')):
      units += c.epochs
  return float(units)


def execute(experiment: str, runs: Sequence[Run], log=print,
            archive: Archive | None = None) -> list[dict]:
  """Runs every run (skipping finished ones) with progress and an ETA; returns the snapshots.
  Each finished run's result files go to `archive` too."""
  from etils import epath
  from jaxprune import pipeline
  from jaxprune.train.loop import format_duration
  seen: set = set()
  units = [_units(r, seen) for r in runs]
  total, done, spent = sum(units), 0.0, 0.0
  start = time.time()
  out = []
  for i, (run, cost) in enumerate(zip(runs, units)):
    snapshot = epath.Path(run.snapshot)
    if snapshot.exists():
      log(f'[{i + 1}/{len(runs)}] {run.name}: finished, skipped')
      total -= cost
      out.append(_checked(run, json.loads(snapshot.read_text())))
      continue
    log(f'[{i + 1}/{len(runs)}] {run.name}: running')
    t = time.time()
    try:
      results = pipeline.run(run.config)
    finally:
      # A baseline that finished is kept even when the run is stopped in a later stage.
      if archive:
        archive.keep_baseline(run.config.baseline_dir)
    results = dict(results, experiment=experiment, run=run.name, labels=run.labels,
                   run_wall_time_s=time.time() - t)
    snapshot.write_text(json.dumps(results, indent=1, sort_keys=True))
    if archive:
      archive.keep(run.config.workdir)
    out.append(results)
    done += cost
    spent = time.time() - start
    eta = spent / done * (total - done) if done else 0.0
    log(f'[{i + 1}/{len(runs)}] {run.name}: test acc '
        f"{100 * _row_of(results, run.config.regime)['test_accuracy']:.2f}%  in "
        f'{time.time() - t:.0f}s; elapsed {format_duration(spent)}, eta {format_duration(eta)}')
  return out


def _checked(run: Run, snapshot: dict) -> dict:
  """A finished run's snapshot; ConfigError if it was made with other settings than the plan
  gives the run (the data's location aside), which would otherwise be skipped unseen."""
  from jaxprune.errors import ConfigError
  from jaxprune.pipeline import config as config_lib
  stored = snapshot.get('config', {})
  planned = config_lib.stage_settings(run.config, run.config.regime)
  for key, value in planned.items():
    value = json.loads(json.dumps(value))   # as stored: tuples are lists
    if key != 'data_path' and key in stored and stored[key] != value:
      raise ConfigError(f'{run.snapshot} is a finished run made with {key}={stored[key]!r}, '
                        f'not {value!r}; give another --root (and --archive) for other '
                        'settings.', settings=(key, 'root'))
  return snapshot


def _row_of(results: dict, regime: str) -> dict:
  return next(r for r in results['rows'] if r['stage'] == regime)


def main(experiment: str, plan: Callable, argv: Sequence[str] | None = None,
         extra_flags: Callable[[Any], None] | None = None,
         description: str = '', defaults: dict | None = None,
         scales: Sequence[str] = ('mini', 'full'),
         instead: Callable[[Any, list], bool] | None = None) -> list:
  """Parses the common flags (plus those `extra_flags(flag_values)` defines), plans, and
  dry-runs or executes; `instead(args, runs)` runs first and, when it returns True, in place
  of the runs."""
  from absl import flags
  from jaxprune.errors import exit_on_user_error
  from jaxprune.train import checkpoint
  # A FlagValues of its own: one process (the tests) may run several experiments.
  flag_values = flags.FlagValues()
  define_flags(flag_values, defaults, scales)
  if extra_flags:
    extra_flags(flag_values)
  # One sentence, no traceback; every finished run's snapshot is already on disk. SIGTERM
  # and Ctrl-C save what trains and exit 75 and 130 (checkpoint.SIGNALS).
  with exit_on_user_error(), checkpoint.SIGNALS.installed():
    args = parse(flag_values, argv, f'python -m experiments.{experiment}', description)
    return _plan_and_execute(experiment, plan, args, instead)


def _plan_and_execute(experiment: str, plan: Callable, args, instead=None) -> list:
  runs = plan(args)
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f'{experiment}: duplicate run names in the plan')
  print(f'{experiment} at scale {args.scale}: {len(runs)} runs under {args.root}')
  print(describe(runs))
  if args.dry_run:
    return runs
  archive = Archive(args.root, args.archive, args.archive_baselines)
  archive.restore()
  sys.stdout.flush()
  quiet_logging()
  from jaxprune.kernels import compiler
  compiler.use_persistent_cache(args.compilation_cache_dir)
  if instead is not None and instead(args, runs):
    archive.keep(os.path.join(args.root, experiment))
    return runs
  return execute(experiment, runs, log=lambda s: print(s, flush=True), archive=archive)


def quiet_logging() -> None:
  """Progress lines only: drops orbax's and absl's own records (several per checkpoint)."""
  import logging as std_logging
  from absl import logging
  logging.set_verbosity(logging.INFO)

  def keep(record):
    return '/orbax/' not in record.pathname and '/absl/' not in record.pathname
  # On the 'absl' logger itself, so the filter holds whichever handler prints the records
  # (absl's own, or the root's default one when absl.app did not start the program).
  std_logging.getLogger('absl').addFilter(keep)
