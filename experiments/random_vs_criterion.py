r"""Does a criterion find a better architecture than random pruning, once both are retrained?

    python -m experiments.random_vs_criterion --scale=mini --root=runs/exp
    python -m experiments.random_vs_criterion --scale=full --root=gs://BUCKET/exp --data_dir=...

For each seed, one baseline is trained; each criterion (taylor, fisher, l1,
bn_scale and random) scores it once and a global MACs-target selection (`macs`,
or `--selection=macs_l2`) prunes it to three MACs budgets. Each pruned
architecture is trained from scratch (scratch-E and scratch-B, [R]) and
fine-tuned from the inherited weights. `python -m experiments.report` then says,
per budget and regime, whether any criterion's accuracy beats random's by more
than the seed spread (see `experiments.report.beats_random`).

mini: resnet8 (the shallowest ResNet of [R]'s CIFAR family) on a fixed random
1,000-image subset of the CIFAR-10 sample, batch 32, 8 epochs, 3 seeds (override with
--model, --epochs, --max_train, --criteria, --budgets, --regimes, --seeds). full: VGG-16 on CIFAR-10, 160 epochs, batch 64, lr 0.1,
fine-tune 40 epochs at 1e-3, 5 seeds. midi (the open question on the full CIFAR-10 at a
CPU's budget): VGG-11 at half width, 15 epochs, batch 64; taylor and random (add l1 with
--criteria), global `macs_l2` selection to 50 % and 25 % of the MACs, each architecture
trained from scratch (scratch-E), seeds 0 and 1; the baselines are those of
`experiments.rethinking --scale=midi` under the same --root.
"""

from experiments import common

EXPERIMENT = 'random_vs_criterion'
CRITERIA = ('taylor', 'fisher', 'l1', 'bn_scale', 'random')
BUDGETS = (0.7, 0.5, 0.3)   # fraction of the MACs kept
REGIMES = ('scratch', 'scratch_b', 'finetune')
DEFAULTS = {'mini': {'model': 'resnet8'}, 'full': {'model': 'vgg16'}}
SCALES = ('mini', 'midi', 'full')
# Per scale: the criteria, MACs budgets, regimes and selection a plain command runs.
LISTS = {
    'criteria': {'mini': CRITERIA, 'midi': ('taylor', 'random'), 'full': CRITERIA},
    'budgets': {'mini': BUDGETS, 'midi': (0.5, 0.25), 'full': BUDGETS},
    'regimes': {'mini': REGIMES, 'midi': ('scratch',), 'full': REGIMES},
}
SELECTION = {'mini': 'macs', 'midi': 'macs_l2', 'full': 'macs'}


def extra_flags(parser):
  from jaxprune.pipeline import config
  config.add_list_argument(parser, 'criteria', 'criterion', LISTS['criteria'])
  config.add_list_argument(parser, 'budgets', 'target_macs', LISTS['budgets'])
  config.add_list_argument(parser, 'regimes', 'regime', LISTS['regimes'])
  parser.add_argument('--selection', default=None, choices=('macs', 'macs_l2'),
                      help='The global MACs-target policy (macs_l2: per-layer L2-normalised '
                           'scores). Default: ' +
                           '; '.join(f'{v} ({k})' for k, v in SELECTION.items()) + '.')


def _list(args, flag: str, setting: str) -> tuple:
  from jaxprune.pipeline import config
  text = getattr(args, flag)
  return (config.parse_list(text, flag, setting) if text is not None
          else LISTS[flag][args.scale])


def plan(args) -> list:
  settings = common.base_settings(args, **DEFAULTS)
  selection = args.selection or SELECTION[args.scale]
  runs = []
  for seed in common.seeds_of(args):
    for budget in _list(args, 'budgets', 'target_macs'):
      for criterion in _list(args, 'criteria', 'criterion'):
        for regime in _list(args, 'regimes', 'regime'):
          path = f'{criterion}/{selection}{budget:.2f}/s{seed}'
          labels = {'criterion': criterion, 'budget': budget, 'seed': seed,
                    'selection': selection}
          runs.append(common.make_run(
              EXPERIMENT, args.root, path, regime, labels, criterion=criterion,
              selection=selection, target_macs=budget, seed=seed, **settings))
  return runs


if __name__ == '__main__':
  common.main(EXPERIMENT, plan, extra_flags=extra_flags, description=__doc__, defaults=DEFAULTS,
              scales=SCALES)
