"""Every setting of a run, declared once: `SETTINGS`.

From each `Setting` (name, type, default, help, allowed values, bounds, stage) come:

* `Config`, the frozen dataclass a run is described by (one field per setting);
* `define_flags`: the absl flags of launch.py and the experiments, with their `--help`;
* `validate`, whose messages name the setting (the command line shows it as its flag);
* `stage_settings(config, stage)`: the settings that identify a stage directory;
* `to_flagfile`: a stored run's configuration as a --flagfile that reproduces it.
"""

import dataclasses
import hashlib
import json
import math
import operator
from typing import Any, Callable, Mapping, Sequence

from jaxprune import data, models, stream
from jaxprune.errors import ConfigError
from jaxprune.kernels import compiler, options as kernel_options
from jaxprune.pipeline import regimes, workdir
from jaxprune.prune import criteria, select, weights
from jaxprune.train import optim, step

# Where a setting belongs. A stage directory is identified by the settings of its stage and
# of the stages it starts from ('baseline' -> 'prune' -> a regime); 'performance' settings
# are recorded in every stage's result but identify none (they change only how fast a step
# runs, and its float rounding); 'run' settings say where and how to run.
STAGES = ('run', 'baseline', 'prune', *regimes.REGIMES, 'performance')
# Where runs without a workdir live (`default_dirs`).
DEFAULT_ROOT = 'runs'

PRUNE_SCHEDULES = {
    'oneshot': 'score once and prune',
    'iterative': 'fine-tune, accumulating the criterion, and remove prune_step channels '
                 'every prune_every steps',
}
REGIME_CHOICES = {**{name: '' for name in regimes.REGIMES}, 'all': 'every regime in turn'}
SEED_BATCHING = {
    'auto': 'loop on CPUs and GPUs, vmap on TPUs',
    'loop': 'one copy after another through the same compiled steps',
    'vmap': 'every stage whose copies have the same widths as one vmapped program',
}


@dataclasses.dataclass(frozen=True)
class Setting:
  """One setting: its flag, its Config field, its check and the stage it identifies.

  `type` is str, int, float or bool; `choices` returns the registry the value must be a key
  of, `also` says what else it may be (description for --help, test of a value); `optional`
  allows None; minimum / maximum are inclusive bounds, above / below exclusive; `environ`: an
  environment variable (kernels.options.ENV_VARS) gives the command line's default;
  `retunable`: may differ on a rerun of a diverged stage (a smaller lr resumes it)."""
  name: str
  type: type
  default: Any
  help: str
  stage: str
  choices: Callable[[], Mapping] | None = None
  also: tuple[str, Callable[[Any], bool]] | None = None
  optional: bool = False
  minimum: float | None = None
  maximum: float | None = None
  above: float | None = None
  below: float | None = None
  environ: bool = False
  retunable: bool = False

  def __post_init__(self):
    if self.stage not in STAGES:
      raise ValueError(f'setting {self.name!r} has stage {self.stage!r}, not one of {STAGES}.')
    if not self.help.strip():
      raise ValueError(f'setting {self.name!r} has no help text.')

  def allowed(self) -> Mapping:
    return self.choices() if self.choices else {}

  def full_help(self) -> str:
    text = self.help
    if self.choices:
      text += ' One of: ' + ', '.join(self.allowed())
      text += f', or {self.also[0]}.' if self.also else '.'
    if self.environ:
      text += f' Default from ${kernel_options.ENV_VARS[self.name]} when set.'
    return text

  def check(self, value) -> None:
    """ConfigError naming this setting unless `value` is allowed."""
    name = self.name
    if value is None:
      if not self.optional:
        raise ConfigError(f'{name} must be given.', settings=(name,))
      return
    if self.type is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
      kind = {str: 'a string', int: 'a whole number', float: 'a number',
              bool: 'true or false'}[self.type]
      raise ConfigError(f'{name} must be {kind}, got {value!r}.', settings=(name,))
    if self.type is float and not math.isfinite(value):
      raise ConfigError(f'{name} must be a finite number, got {value}.', settings=(name,))
    if self.choices and not (self.also and self.also[1](value)) and value not in self.allowed():
      also = f', or {self.also[0]}' if self.also else ''
      raise ConfigError(f"unknown {name} {value!r}; choose one of: "
                        f"{', '.join(sorted(self.allowed()))}{also}.", settings=(name,))
    for bound, outside, words in ((self.minimum, operator.lt, 'at least'),
                                  (self.maximum, operator.gt, 'at most'),
                                  (self.above, operator.le, 'above'),
                                  (self.below, operator.ge, 'below')):
      if bound is not None and outside(value, bound):
        raise ConfigError(f'{name} must be {words} {bound:g}, got {value}.', settings=(name,))


def _selections():
  return {name: f'needs {_TARGET_OF_NEED[policy.needs]}'
          for name, policy in select.SELECTIONS.items()}


_TARGET_OF_NEED = {'ratio': 'prune_ratio', 'target_macs': 'target_macs', 'preset': 'preset'}

SETTINGS: tuple[Setting, ...] = (
    # Where and how to run.
    Setting('workdir', str, None, 'Work directory (local path or gs://). Default: '
            f'{DEFAULT_ROOT}/MODEL-DATASET/CRITERION-SELECTION-<digest of the baseline, prune '
            'and regime settings>, so runs of other settings never share one.', 'run',
            optional=True),
    Setting('baseline_dir', str, None, 'Reuse (or create) the baseline stage here, shared by '
            'every criterion x regime run with the same baseline settings. Default: '
            'WORKDIR/baseline when workdir is given, else '
            f'{DEFAULT_ROOT}/MODEL-DATASET/baseline-<digest of the baseline settings>.', 'run',
            optional=True),
    Setting('data_dir', str, None, 'TFDS data directory holding a prepared cifar10, cifar100, '
            'imagenet2012 or tfds:NAME (as array_record).', 'run', optional=True),
    Setting('regime', str, 'scratch', 'Retraining regime(s) to run after pruning.', 'run',
            choices=lambda: REGIME_CHOICES),
    Setting('seeds', int, 1, 'Train this many independent copies (seeds seed, seed+1, ...) in '
            'WORKDIR/seed<N> and report mean ± std.', 'run', minimum=1),
    Setting('seed_batching', str, 'auto', 'How seeds > 1 copies train.', 'run',
            choices=lambda: SEED_BATCHING),
    Setting('steps_per_call', int, None, 'Training steps per compiled call (one loop on the '
            'device: batches, augmentation and learning rates made inside it). A SIGTERM or '
            'Ctrl-C is honoured at the next call boundary, so this bounds how late; 1 steps one '
            'by one. Fits with a per-step hook (iterative pruning) always step one by one. '
            'Default: 10 on CPUs, 50 on GPUs and TPUs.', 'run', optional=True, minimum=1),
    Setting('multihost', bool, False, 'Join a multi-process run (jax.distributed): a TPU VM '
            "pod's workers, SLURM or Open MPI tasks find each other; elsewhere give "
            'coordinator_address, num_processes and process_id.', 'run'),
    Setting('coordinator_address', str, None, "multihost: process 0's HOST:PORT, the same for "
            'every process (default: detected on TPU VMs, SLURM, Open MPI).', 'run', optional=True),
    Setting('num_processes', int, None, 'multihost: how many processes the run has (default: '
            'detected).', 'run', optional=True, minimum=1),
    Setting('process_id', int, None, "multihost: this process's index, 0 to num_processes-1 "
            '(default: detected).', 'run', optional=True, minimum=0),
    Setting('multihost_timeout', int, 300, 'multihost: seconds to wait for every process to '
            'join, or to answer an agreement; a process silent this long counts as dead and the '
            'others stop.', 'run', minimum=1),
    Setting('compilation_cache_dir', str, None, 'Persistent compilation cache (local path or '
            'gs://): runs of the same model and widths load compiled steps instead of compiling '
            f"them. Default: $JAX_COMPILATION_CACHE_DIR if set, else {compiler.DEFAULT_CACHE_DIR}; "
            "'' turns it off.", 'run', optional=True),
    # The baseline.
    Setting('model', str, 'tiny', 'Model: a built-in one, or your own Flax model as the '
            'factory that makes it (README, "Your own model").', 'baseline',
            choices=lambda: models.MODELS,
            also=('package.module:factory', lambda value: models.own.is_own(value))),
    Setting('width_multiplier', float, 1.0, "Every default width of the model times this "
            '(rounded, at least 1 channel): e.g. 0.5 for a half-width member of the family.',
            'baseline', above=0),
    Setting('bn_scale_init', float, 1.0, "Every BatchNorm scale's (gamma's) initial value "
            "(0.5 in [R]'s network-slimming models and L1-norm VGG).", 'baseline', minimum=0),
    Setting('dense_init', str, 'lecun_normal', "Initialiser of every Dense layer's kernel "
            '(biases start at zero).', 'baseline', choices=lambda: models.layers.DENSE_INITS),
    Setting('resnet_shortcut', str, 'subsample', 'The downsampling shortcut of the '
            'basic-block ResNets (resnet*).', 'baseline', choices=lambda: models.resnet.SHORTCUTS),
    Setting('dataset', str, 'digits', "Dataset. digits is scikit-learn's bundled 8x8 "
            'handwritten digits (offline).', 'baseline', choices=lambda: data.DATASETS,
            also=data.OTHER_DATASETS),
    Setting('input', str, 'auto', 'How the data reaches the training step: device holds the '
            'whole dataset on every device; stream reads it batch by batch with grain, '
            'augmented on the host (docs/streaming.md); auto is device for digits, npz, '
            'cifar10 and cifar100, stream for imagenet2012 and tfds:NAME.', 'baseline',
            choices=lambda: stream.INPUTS),
    Setting('image_size', int, 224, 'Side of the square crops of a dataset whose images vary '
            'in size (imagenet2012): random-resized crops for training, the centre crop of '
            'the image resized to image_size x 256/224 for testing.', 'baseline', minimum=8),
    Setting('input_workers', int, None, 'input=stream: host processes that decode and augment '
            'images (0: threads of the training process). Default: the CPU cores less one, '
            'at most 16.', 'run', optional=True, minimum=0),
    Setting('data_path', str, None, 'The .npz file for dataset=npz (keys train_images, '
            'train_labels, test_images, test_labels; uint8 NHWC).', 'baseline', optional=True),
    Setting('max_train', int, None, 'Train on a fixed random subset of N training images (the '
            'same N images for every seed).', 'baseline', optional=True, minimum=1),
    Setting('epochs', int, 160, 'Baseline epochs (scratch uses the same; scratch_b scales them '
            'by the MACs ratio).', 'baseline', minimum=1),
    Setting('batch_size', int, 64, 'Global batch size.', 'baseline', minimum=1),
    Setting('lr', float, 0.1, 'Baseline and from-scratch learning rate.', 'baseline', above=0,
            retunable=True),
    Setting('lr_schedule', str, 'step', 'Learning-rate schedule (step: x0.1 at 50% and 75% of '
            'the epochs).', 'baseline', choices=lambda: optim.SCHEDULES),
    Setting('lr_decay_epochs', str, None, 'Comma-separated epochs at which the step schedule '
            'multiplies the learning rate by lr_decay_factor (default: 50% and 75% of the '
            "epochs; scratch_b scales them with its epochs). [C]: 60,120,160.", 'baseline',
            optional=True),
    Setting('lr_decay_factor', float, 0.1, "The step schedule's multiplier at each decay "
            "([C]: 0.2).", 'baseline', above=0, maximum=1),
    Setting('weight_decay', float, 1e-4, 'Coupled weight decay.', 'baseline', minimum=0),
    Setting('pad_mode', str, 'zero', "How the random crop's border is filled.", 'baseline',
            choices=lambda: data.PAD_MODES),
    Setting('bn_l1', float, 0.0, "Network slimming's L1 sparsity on BN scales for the baseline "
            '(1e-4 for VGG).', 'baseline', minimum=0),
    Setting('precision', str, 'float32', 'Compute dtype of every training and evaluation step '
            '(parameters, their updates and the optimizer state stay float32; bfloat16 is meant '
            'for GPUs and TPUs).', 'baseline', choices=lambda: step.PRECISIONS),
    Setting('seed', int, 0, 'Seed of init, data order and random choices.', 'baseline', minimum=0),
    # Pruning.
    Setting('criterion', str, 'taylor', 'Importance criterion.', 'prune',
            choices=lambda: criteria.CRITERIA),
    Setting('selection', str, 'global_l2', 'Selection policy.', 'prune', choices=_selections),
    Setting('granularity', str, 'channel', 'What pruning removes.', 'prune',
            choices=lambda: weights.GRANULARITIES),
    Setting('prune_ratio', float, None, 'Fraction of prunable channels to remove, in [0, 1) '
            '(default 0.5 for the ratio policies).', 'prune', optional=True, minimum=0, below=1),
    Setting('target_macs', float, None, 'Fraction of the MACs to keep, in (0, 1] (macs, '
            'macs_l2).', 'prune', optional=True, above=0, maximum=1),
    Setting('preset', str, None, 'Li et al. preset.', 'prune', optional=True,
            choices=lambda: select.PRESETS),
    Setting('min_channels', int, 1, 'Channels every group keeps at least.', 'prune', minimum=1),
    Setting('round_to', int, 1, "Round every group's kept channels up to a multiple of this "
            '(one-shot; e.g. 8: widths that run faster, MACs slightly above the target).',
            'prune', minimum=1),
    Setting('flops_penalty', float, 0.0, 'FLOPs-aware penalty lambda for the global policies '
            '(1e-3 in Molchanov et al.).', 'prune', minimum=0),
    Setting('flops_cost', str, 'relative', "What the FLOPs penalty multiplies: absolute with "
            "flops_penalty=1e-3 is the unnormalised form of [M]'s public code.", 'prune',
            choices=lambda: select.FLOPS_COSTS),
    Setting('width_profile', int, 0, 'selection=random_widths: which sampled width profile, '
            "the seed of its per-group keep fractions (independent of seed, so one profile "
            'trains under every seed).', 'prune', minimum=0),
    Setting('kept_channels', str, 'criterion', 'Which channels each pruned group keeps at the '
            "widths the selection chose (one-shot channel pruning); random tells a criterion's "
            'channels from its widths.', 'prune', choices=lambda: select.KEPT_CHANNELS),
    Setting('schedule', str, 'oneshot', 'Pruning schedule.', 'prune',
            choices=lambda: PRUNE_SCHEDULES),
    Setting('prune_batches', int, 8, 'Training batches a one-shot data criterion reads.',
            'prune', minimum=1),
    Setting('finetune_batch_size', int, None, 'Batch size of fine-tuning: the iterative '
            "schedule's and the finetune regime's (default: batch_size; [M]: 32).", 'prune',
            optional=True, minimum=1),
    Setting('prune_every', int, 10, 'Iterative: fine-tuning steps between removals.', 'prune',
            minimum=1),
    Setting('prune_step', int, 1, 'Iterative: channels removed at each removal.', 'prune',
            minimum=1),
    # The regimes.
    Setting('finetune_epochs', int, 40, 'Epochs of the finetune regime.', 'finetune', minimum=1),
    Setting('finetune_lr', float, 1e-3, 'Constant learning rate of fine-tuning.', 'finetune',
            above=0, retunable=True),
    Setting('lottery_style', str, 'slice', "How the lottery regime starts from the "
            "baseline's initial weights ([R]'s numbers: mask).", 'lottery',
            choices=lambda: regimes.LOTTERY_STYLES),
    Setting('reduced_match', str, 'macs', "What the reduced regime's uniformly thinner "
            'network matches.', 'reduced', choices=lambda: regimes.REDUCED_MATCH),
    Setting('scratch_b_cap', float, None, 'Cap scratch_b at this multiple of epochs.',
            'scratch_b', optional=True, minimum=1),
    # How fast a step runs.
    Setting('conv_impl', str, 'auto', 'Convolution implementation.', 'performance',
            choices=lambda: kernel_options.CONV_IMPLS, environ=True),
    Setting('batch_norm', str, 'jaxprune', 'BatchNorm implementation (the same function and '
            'variables either way).', 'performance', choices=lambda: kernel_options.BATCH_NORMS,
            environ=True),
    Setting('xla_options', str, 'jaxprune', 'XLA compiler options every jitted model function '
            'compiles with.', 'performance', choices=lambda: kernel_options.XLA_OPTION_SETS,
            environ=True),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


Config = dataclasses.make_dataclass(
    'Config', [(s.name, s.type | None if s.optional else s.type,
                dataclasses.field(default=s.default)) for s in SETTINGS], frozen=True,
    namespace={'__doc__': 'Everything a run depends on: one field per entry of SETTINGS.',
               '__module__': __name__})


def make(**values) -> 'Config':
  """A Config from setting values, with the derived defaults: prune_ratio 0.5 for the ratio
  policies when none is given, and without a workdir the directories of `default_dirs`."""
  config = Config(**values)
  policy = select.SELECTIONS.get(config.selection)
  if policy is not None and policy.needs == 'ratio' and config.prune_ratio is None:
    config = dataclasses.replace(config, prune_ratio=0.5)
  if config.workdir is None:
    derived_workdir, derived_baseline_dir = default_dirs(config)
    config = dataclasses.replace(config, workdir=derived_workdir,
                                 baseline_dir=config.baseline_dir or derived_baseline_dir)
  return config


def _digest(settings: Mapping) -> str:
  # Only values that differ from their defaults: a setting added later, at its default,
  # leaves every existing name as it was.
  changed = {k: v for k, v in settings.items() if v != BY_NAME[k].default}
  return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]


def default_dirs(config) -> tuple[str, str]:
  """(workdir, baseline_dir) named from the settings: runs differing in any baseline, prune or
  regime setting get their own workdir; those with the same baseline settings share one."""
  # An own model's package.module:factory, with a dot for the colon paths dislike.
  root = f"{DEFAULT_ROOT}/{config.model.replace(':', '.')}-{config.dataset}"
  identity = {s.name: getattr(config, s.name) for s in SETTINGS
              if s.stage not in ('run', 'performance')}
  return (f'{root}/{config.criterion}-{config.selection}-{_digest(identity)}',
          f"{root}/baseline-{_digest(stage_settings(config, 'baseline'))}")


def performance_options(config) -> kernel_options.PerformanceOptions:
  return kernel_options.PerformanceOptions(
      **{s.name: getattr(config, s.name) for s in SETTINGS if s.stage == 'performance'})


def stage_settings(config, stage: str) -> dict:
  """The settings identifying `stage`'s directory: its own and those of the stages it comes from."""
  if stage not in STAGES or stage in ('run', 'performance'):
    raise ValueError(f'{stage!r} is not a stage with a directory.')
  chain = {'baseline': ('baseline',), 'prune': ('baseline', 'prune')}.get(
      stage, ('baseline', 'prune', stage))
  return {s.name: getattr(config, s.name) for s in SETTINGS if s.stage in chain}


def regimes_of(config) -> tuple[str, ...]:
  return regimes.REGIMES if config.regime == 'all' else (config.regime,)


def decay_epochs(config) -> tuple[int, ...] | None:
  """The step schedule's decay epochs of `lr_decay_epochs` (None: 50% and 75%); ConfigError
  unless they are ascending whole epochs within the baseline's and the schedule is 'step'."""
  if config.lr_decay_epochs is None:
    return None
  text = config.lr_decay_epochs
  if config.lr_schedule != 'step':
    raise ConfigError(f'lr_decay_epochs={text} sets the step schedule\'s decays; '
                      f'lr_schedule is {config.lr_schedule}.',
                      settings=('lr_decay_epochs', 'lr_schedule'))
  entries = [x.strip() for x in text.split(',')]
  if not all(x.isdigit() for x in entries):
    raise ConfigError(f'lr_decay_epochs {text!r} is not a comma-separated list of whole '
                      'epochs, e.g. 60,120,160.', settings=('lr_decay_epochs',))
  epochs = tuple(int(x) for x in entries)
  if list(epochs) != sorted(epochs) or not 0 < epochs[0] or epochs[-1] > config.epochs:
    raise ConfigError(f'lr_decay_epochs {text!r} must ascend within 1..{config.epochs} '
                      '(the epochs).', settings=('lr_decay_epochs', 'epochs'))
  return epochs


def validate(config) -> None:
  """Checks every value and combination before anything is trained or written (ConfigError)."""
  for setting in SETTINGS:
    setting.check(getattr(config, setting.name))
  needs = _TARGET_OF_NEED[select.SELECTIONS[config.selection].needs]
  if getattr(config, needs) is None:
    raise ConfigError(f'selection={config.selection} needs {needs}.', settings=('selection', needs))
  for other in _TARGET_OF_NEED.values():
    if other != needs and getattr(config, other) is not None:
      raise ConfigError(f'selection={config.selection} takes {needs}, not {other}.',
                        settings=('selection', needs, other))
  # granularity=weight takes [R]'s weight-level recipe's pruning settings only.
  weight_level = config.granularity == 'weight'
  if weight_level and config.criterion != weights.WEIGHT_CRITERION:
    raise ConfigError(f'granularity=weight scores every conv weight by |w| '
                      f'(criterion={weights.WEIGHT_CRITERION}), not criterion={config.criterion}.',
                      settings=('granularity', 'criterion'))
  if weight_level and config.selection not in weights.WEIGHT_SELECTIONS:
    raise ConfigError(f"granularity=weight thresholds |w| over all conv weights (global) or "
                      f"within each conv (layer), not selection={config.selection}.",
                      settings=('granularity', 'selection'))
  if weight_level and config.schedule != 'oneshot':
    raise ConfigError(f'granularity=weight prunes once (schedule=oneshot), not '
                      f'schedule={config.schedule}.', settings=('granularity', 'schedule'))
  if config.preset is not None:
    family = select.PRESETS[config.preset].models
    if config.model not in family:
      raise ConfigError(f"preset {config.preset!r} is for {' or '.join(family)}, not for "
                        f'{config.model}.', settings=('preset',))
  if config.schedule == 'iterative' and config.round_to != 1:
    raise ConfigError(f"round_to={config.round_to} rounds a one-shot selection's widths; use "
                      'it with schedule=oneshot.', settings=('round_to', 'schedule'))
  if (config.width_profile != BY_NAME['width_profile'].default
      and not select.SELECTIONS[config.selection].profile):
    raise ConfigError(f'width_profile={config.width_profile} numbers the profiles of '
                      f'selection=random_widths, not of selection={config.selection}.',
                      settings=('width_profile', 'selection'))
  if config.kept_channels != 'criterion' and (config.schedule != 'oneshot'
                                              or config.granularity != 'channel'):
    raise ConfigError(f'kept_channels={config.kept_channels} redraws the channels of a one-shot '
                      'channel selection; use it with schedule=oneshot and granularity=channel.',
                      settings=('kept_channels', 'schedule', 'granularity'))
  if config.schedule == 'iterative' and select.SELECTIONS[config.selection].profile:
    raise ConfigError(f'schedule=iterative removes the globally lowest channels and cannot '
                      f'follow selection={config.selection}; use schedule=oneshot.',
                      settings=('schedule', 'selection'))
  if config.schedule == 'iterative' and needs == 'preset':
    raise ConfigError('schedule=iterative removes channels globally and cannot follow a '
                      'per-layer preset; use schedule=oneshot.', settings=('schedule', 'preset'))
  decay_epochs(config)
  if config.resnet_shortcut != BY_NAME['resnet_shortcut'].default and not isinstance(
      models.build(config.model), models.ResNet):
    raise ConfigError(f'resnet_shortcut={config.resnet_shortcut} is for the basic-block '
                      f'ResNets (resnet*), not {config.model}.',
                      settings=('resnet_shortcut', 'model'))
  if config.dataset == 'npz' and not config.data_path:
    raise ConfigError('dataset=npz needs data_path=FILE.npz.', settings=('dataset', 'data_path'))
  workdir.check_workdir(config.workdir)
  if config.baseline_dir:
    workdir.check_workdir(config.baseline_dir, 'baseline_dir')


def define_flags(flag_values=None, names: Sequence[str] | None = None) -> None:
  """Defines one absl flag per setting (launch.py), or per setting of `names` (an experiment's)."""
  from absl import flags
  flag_values = flag_values if flag_values is not None else flags.FLAGS
  define = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
            bool: flags.DEFINE_bool}
  for setting in SETTINGS if names is None else [BY_NAME[name] for name in names]:
    default = setting.default
    if setting.environ:
      default = kernel_options.env_value(setting.name) or default
    define[setting.type](setting.name, default, setting.full_help(), flag_values=flag_values)


_HELP_FLAGS = ('--help', '-help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')


def parse_command_line(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing for `app.run(flags_parser=...)`, with one sentence (and exit status
  1) for a --flagfile that is not a text file, where absl raises UnicodeDecodeError, and
  exit status 0 after --help (absl exits 1 once it has printed the help asked for)."""
  from absl import app
  try:
    return app.parse_flags_with_usage(list(argv))
  except SystemExit as stop:
    if stop.code == 1 and any(a in _HELP_FLAGS for a in argv[1:]):
      raise SystemExit(0) from None
    raise
  except UnicodeDecodeError as error:
    named = [a.split('=', 1)[1] for a in argv if a.startswith(('--flagfile=', '-flagfile='))]
    which = f' {named[0]}' if len(named) == 1 else ''
    raise SystemExit(f'error: --flagfile{which} is not a text file of flags (byte '
                     f'{error.start} is not UTF-8).') from None


def from_flags(flag_values=None) -> 'Config':
  """The Config of parsed absl flags (defined by `define_flags`)."""
  from absl import flags
  flag_values = flag_values if flag_values is not None else flags.FLAGS
  return make(**{s.name: flag_values[s.name].value for s in SETTINGS})


def parse_list(text: str, flag: str, name: str) -> tuple:
  """The entries of a comma-separated `--FLAG` as values of setting `name` (ConfigError)."""
  setting = BY_NAME[name]
  entries = [x.strip() for x in text.split(',') if x.strip()]
  kind = {int: 'whole numbers', float: 'numbers'}.get(setting.type, 'names')
  if not entries:
    raise ConfigError(f'{flag} is empty; give one or more comma-separated {kind}.',
                      settings=(flag,))
  try:
    values = tuple(setting.type(x) for x in entries)
  except ValueError:
    raise ConfigError(f'{flag} {text!r} is not a comma-separated list of {kind}.',
                      settings=(flag,)) from None
  for value in values:
    try:
      setting.check(value)
    except ConfigError as error:
      raise ConfigError(f'{flag} value {value!r}: {error}', settings=(flag,)) from None
  return values


def to_flagfile(config) -> str:
  """The configuration as launch.py flags, one per line: `--flagfile=` of it reruns the run."""
  lines = []
  for setting in SETTINGS:
    value = getattr(config, setting.name)
    if value is None:
      continue
    if setting.type is bool:
      lines.append(f"--{'' if value else 'no'}{setting.name}")
    else:
      lines.append(f'--{setting.name}={repr(value) if setting.type is float else value}')
  return '\n'.join(lines) + '\n'


def from_record(record: Mapping) -> 'Config':
  """The Config stored in a results.json's 'config' (settings it does not know are refused)."""
  unknown = sorted(set(record) - set(BY_NAME))
  if unknown:
    raise ConfigError(f"the stored configuration has settings this version does not know: "
                      f"{', '.join(unknown)}.")
  return Config(**record)
