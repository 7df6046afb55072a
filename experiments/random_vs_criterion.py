r"""Does a criterion find a better architecture than random pruning, once both are retrained?

    python -m experiments.random_vs_criterion --scale=mini --root=runs/exp
    python -m experiments.random_vs_criterion --scale=midi --data_path=CIFAR10.npz --root=runs/midi
    python -m experiments.random_vs_criterion --scale=full --root=gs://BUCKET/exp --data_dir=...

For each seed, one baseline is trained. At every MACs budget the experiment builds
architectures of equal cost and trains each of them:

* one per criterion (taylor, fisher, l1, bn_scale and random scores): the criterion scores
  the baseline once and a global MACs-target selection (`macs`, or `macs_l2`) prunes it;
* `uniform`: the unpruned network made uniformly thinner to the MACs of random's pruned
  network (the `reduced` regime, [C]'s control), trained from scratch;
* `profile0`, `profile1`, ...: randomly sampled width profiles at the budget (selection
  `random_widths`: every group's keep fraction drawn from U(0.1, 1), then scaled by one
  factor to the budget; MACs within 1 % below it), trained from scratch. A profile's
  widths depend on its number only, so every seed trains the same profiles.

The criteria's architectures train in every regime of --regimes (scratch-E, scratch-B and
fine-tuning, [R]); the controls train from scratch (scratch-E). Trained from scratch, only
widths matter. For fine-tuning, the channels matter too: each criterion of
--channel_criteria is also pruned to its own widths with channels drawn at random within
each group (`kept_channels=random`), and both are fine-tuned at the --channel_budgets, which
tells good channels from good widths.

`python -m experiments.report` compares every architecture with random scores and with
uniform, paired by seed (one baseline, one data order per seed): mean paired difference,
its 95 % bootstrap interval and the paired t-test, and one verdict per budget.
The same command with `--latency` runs nothing and times the inference of every finished
architecture and of the unpruned network on this machine (batch 1 and 128) into
ROOT/random_vs_criterion/latency.json, which the report shows beside the MACs; run it on a
quiet machine.

mini: resnet8 on a fixed random 1,000-image subset of the CIFAR-10 sample, batch 32, 8
epochs, 3 seeds. midi (the open question on the full CIFAR-10 at a CPU's budget): VGG-11 at
half width, 15 epochs, batch 64, lr 0.1 (x0.1 at 50 % and 75 %), wd 1e-4; taylor, l1 and
random scores, uniform and two profiles, global `macs_l2` selection to 50 % and 25 % of the
MACs, scratch-E, 3 seeds; taylor's and l1's channels against random channels fine-tuned at
50 %; the baselines are those of `experiments.rethinking --scale=midi` under the same
--root. full: [R]'s CIFAR-10 recipes on VGG-16 and ResNet-56 (--model), 160 epochs, batch
64, lr 0.1, fine-tuning 40 epochs at 1e-3, 5 seeds. Override any list with its flag.
"""

from absl import flags

from experiments import common

EXPERIMENT = 'random_vs_criterion'
CRITERIA = ('taylor', 'fisher', 'l1', 'bn_scale', 'random')
BUDGETS = (0.7, 0.5, 0.3)   # fraction of the MACs kept
REGIMES = ('scratch', 'scratch_b', 'finetune')
DEFAULTS = {'mini': {'model': 'resnet8'}, 'full': {'model': 'vgg16'}}
# [R]'s CIFAR-10 models at full scale, planned together unless --model names one.
FULL_MODELS = ('vgg16', 'resnet56')
SCALES = ('mini', 'midi', 'full')
# Per scale: what a plain command runs (each overridden by the flag of the same name).
LISTS = {
    'criteria': {'mini': CRITERIA, 'midi': ('taylor', 'l1', 'random'), 'full': CRITERIA},
    'budgets': {'mini': BUDGETS, 'midi': (0.5, 0.25), 'full': BUDGETS},
    'regimes': {'mini': REGIMES, 'midi': ('scratch',), 'full': REGIMES},
    'channel_criteria': {'mini': ('taylor', 'l1'), 'midi': ('taylor', 'l1'),
                         'full': ('taylor', 'l1')},
    'channel_budgets': {'mini': (0.5,), 'midi': (0.5,), 'full': (0.5,)},
}
PROFILES = {'mini': 2, 'midi': 2, 'full': 2}
SELECTION = {'mini': 'macs', 'midi': 'macs_l2', 'full': 'macs'}
# The architecture whose pruned MACs the uniform network matches.
UNIFORM_OF = 'random'


def extra_flags(flag_values):
  for flag, setting in (('criteria', 'criterion'), ('budgets', 'target_macs'),
                        ('regimes', 'regime'), ('channel_criteria', 'criterion'),
                        ('channel_budgets', 'target_macs')):
    # An empty --channel_criteria (or --channel_budgets) leaves the channel comparison out.
    common.define_list_flag(flag_values, flag, setting, LISTS[flag])
  flags.DEFINE_integer('profiles', None, 'Randomly sampled width profiles per budget (0: none). '
                       'Default: ' + '; '.join(f'{v} ({k})' for k, v in PROFILES.items()) + '.',
                       flag_values=flag_values)
  flags.DEFINE_bool('uniform', True, 'Train the uniformly thinner network of every budget '
                    '(--nouniform leaves it out).', flag_values=flag_values)
  flags.DEFINE_enum('selection', None, ('macs', 'macs_l2'), 'The global MACs-target policy '
                    '(macs_l2: per-layer L2-normalised scores). Default: ' +
                    '; '.join(f'{v} ({k})' for k, v in SELECTION.items()) + '.',
                    flag_values=flag_values)
  flags.DEFINE_bool('latency', False, 'Run nothing; time every finished architecture and the '
                    'unpruned network on this machine (batch 1 and 128) into '
                    'ROOT/random_vs_criterion/latency.json.',
                    flag_values=flag_values)


def _list(args, flag: str, setting: str) -> tuple:
  from jaxprune.pipeline import config
  text = getattr(args, flag)
  if text is None:
    return LISTS[flag][args.scale]
  if flag.startswith('channel_') and not text.strip():
    return ()   # no channel comparison
  return config.parse_list(text, flag, setting)


def _profiles(args) -> int:
  count = PROFILES[args.scale] if args.profiles is None else args.profiles
  if count < 0:
    from jaxprune.errors import ConfigError
    raise ConfigError(f'--profiles must be at least 0, got {count}.')
  return count


def plan(args) -> list:
  settings = common.base_settings(args, **DEFAULTS)
  models = FULL_MODELS if args.scale == 'full' and args.model is None else (settings['model'],)
  runs = []
  for model in models:
    settings = dict(settings, model=model)
    prefix = f'{model}/' if len(models) > 1 else ''
    runs += _plan_model(args, settings, prefix)
  return _unique(runs)


def _plan_model(args, settings: dict, prefix: str) -> list:
  selection = args.selection or SELECTION[args.scale]
  criteria = _list(args, 'criteria', 'criterion')
  regimes = _list(args, 'regimes', 'regime')
  channel_criteria = _list(args, 'channel_criteria', 'criterion')
  channel_budgets = _list(args, 'channel_budgets', 'target_macs')
  runs = []

  def add(architecture, path, regime, budget, seed, channels='criterion', **pruning):
    labels = {'architecture': architecture, 'criterion': pruning['criterion'],
              'budget': budget, 'seed': seed, 'selection': selection,
              'regime': 'scratch' if regime == 'reduced' else regime, 'channels': channels}
    run = common.make_run(EXPERIMENT, args.root, prefix + path, regime, labels, seed=seed,
                          target_macs=budget, **pruning, **settings)
    runs.append(run)

  for seed in common.seeds_of(args):
    for budget in _list(args, 'budgets', 'target_macs'):
      where = f'{selection}{budget:.2f}/s{seed}'
      # The short fine-tuning comparisons first: a study stopped part way has them
      # for every seed it reached before the long scratch runs.
      if budget in channel_budgets:
        for criterion in channel_criteria:
          add(criterion, f'{criterion}/{where}', 'finetune', budget, seed, criterion=criterion,
              selection=selection)
          add(criterion, f'{criterion}_random_channels/{where}', 'finetune', budget, seed,
              channels='random', criterion=criterion, selection=selection,
              kept_channels='random')
      for criterion in criteria:
        for regime in regimes:
          add(criterion, f'{criterion}/{where}', regime, budget, seed, criterion=criterion,
              selection=selection)
      if args.uniform:
        add('uniform', f'{UNIFORM_OF}/{where}', 'reduced', budget, seed, criterion=UNIFORM_OF,
            selection=selection)
      for profile in range(_profiles(args)):
        add(f'profile{profile}', f'profile{profile}/random_widths{budget:.2f}/s{seed}',
            'scratch', budget, seed, criterion='random', selection='random_widths',
            width_profile=profile)
  return runs


def _unique(runs: list) -> list:
  """The plan without repeats (a criterion's fine-tuning can be both in --regimes and in the
  channel comparison), in first-planned order."""
  seen, out = set(), []
  for run in runs:
    if run.name not in seen:
      seen.add(run.name)
      out.append(run)
  return out


def latency_instead(args, runs: list) -> bool:
  if args.latency:
    from experiments import architecture_latency
    architecture_latency.measure(args.root, EXPERIMENT, runs)
  return args.latency


if __name__ == '__main__':
  common.main(EXPERIMENT, plan, extra_flags=extra_flags, description=__doc__, defaults=DEFAULTS,
              scales=SCALES, instead=latency_instead)
