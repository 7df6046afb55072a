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
fine-tune 40 epochs at 1e-3, 5 seeds.
"""

from experiments import common

EXPERIMENT = 'random_vs_criterion'
CRITERIA = ('taylor', 'fisher', 'l1', 'bn_scale', 'random')
BUDGETS = (0.7, 0.5, 0.3)   # fraction of the MACs kept
REGIMES = ('scratch', 'scratch_b', 'finetune')
DEFAULTS = {'mini': {'model': 'resnet8'}, 'full': {'model': 'vgg16'}}


def extra_flags(parser):
  from jaxprune.pipeline import config
  config.add_list_argument(parser, 'criteria', 'criterion', CRITERIA)
  config.add_list_argument(parser, 'budgets', 'target_macs', BUDGETS)
  config.add_list_argument(parser, 'regimes', 'regime', REGIMES)
  parser.add_argument('--selection', default='macs', choices=('macs', 'macs_l2'),
                      help='The global MACs-target policy (macs_l2: per-layer L2-normalised '
                           'scores). Default: macs.')


def plan(args) -> list:
  from jaxprune.pipeline import config
  settings = common.base_settings(args, **DEFAULTS)
  runs = []
  for seed in common.seeds_of(args):
    for budget in config.parse_list(args.budgets, 'budgets', 'target_macs'):
      for criterion in config.parse_list(args.criteria, 'criteria', 'criterion'):
        for regime in config.parse_list(args.regimes, 'regimes', 'regime'):
          path = f'{criterion}/{args.selection}{budget:.2f}/s{seed}'
          labels = {'criterion': criterion, 'budget': budget, 'seed': seed,
                    'selection': args.selection}
          runs.append(common.make_run(
              EXPERIMENT, args.root, path, regime, labels, criterion=criterion,
              selection=args.selection, target_macs=budget, seed=seed, **settings))
  return runs


if __name__ == '__main__':
  common.main(EXPERIMENT, plan, extra_flags=extra_flags, description=__doc__, defaults=DEFAULTS)
