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
  parser.add_argument('--criteria', default=','.join(CRITERIA))
  parser.add_argument('--budgets', default=','.join(map(str, BUDGETS)),
                      help='Fractions of the MACs kept (comma-separated).')
  parser.add_argument('--regimes', default=','.join(REGIMES))
  parser.add_argument('--selection', default='macs', choices=('macs', 'macs_l2'))


def plan(args) -> list:
  settings = common.base_settings(args, **DEFAULTS)
  runs = []
  for seed in common.seeds_of(args):
    for budget in common.csv_list(args.budgets, float, 'budgets'):
      for criterion in common.csv_list(args.criteria, str, 'criteria'):
        for regime in common.csv_list(args.regimes, str, 'regimes'):
          path = f'{criterion}/{args.selection}{budget:.2f}/s{seed}'
          labels = {'criterion': criterion, 'budget': budget, 'seed': seed,
                    'selection': args.selection}
          runs.append(common.make_run(
              EXPERIMENT, args.root, path, regime, labels, criterion=criterion,
              selection=args.selection, target_macs=budget, seed=seed, **settings))
  return runs


if __name__ == '__main__':
  common.main(EXPERIMENT, plan, extra_flags=extra_flags, description=__doc__)
