r"""[C]: Fisher-pruned WideResNets against uniformly reduced WideResNets, both trained from scratch.

    python -m experiments.crowley --scale=mini --root=runs/exp --dry_run

Fisher pruning (criterion fisher, iterative schedule, global ranking without
normalisation as in [C]'s code, one channel every `prune_every` steps) takes the
baseline to several MACs budgets; each pruned architecture is trained from
scratch (`scratch`) and compared with the same family made uniformly thinner to
the same MACs (`reduced`). [C] matches parameter counts; jaxprune's `reduced`
regime matches MACs (stated in the table).
full: wrn40_2 on CIFAR-10 (the papers' 200-epoch WRN schedule is approximated by
jaxprune's step schedule over --epochs=200; lr 0.1), 5 seeds.
mini: wrn16_2 stands in for wrn40_2.
"""

from experiments import common

EXPERIMENT = 'crowley'
BUDGETS = (0.75, 0.5, 0.25)
REGIMES = ('scratch', 'reduced')
DEFAULTS = {'mini': {'model': 'wrn16_2'},
            'full': {'model': 'wrn40_2', 'epochs': 200, 'weight_decay': 5e-4,
                     'finetune_lr': 8e-4}}


def extra_flags(parser):
  parser.add_argument('--budgets', default=','.join(map(str, BUDGETS)),
                      help='Fractions of the MACs kept.')
  parser.add_argument('--regimes', default=','.join(REGIMES))
  parser.add_argument('--prune_every', type=int, default=100)


def plan(args) -> list:
  settings = common.base_settings(args, **DEFAULTS)
  runs = []
  for seed in common.seeds_of(args):
    for budget in common.csv_list(args.budgets, float):
      for regime in common.csv_list(args.regimes):
        path = f'fisher/macs{budget:.2f}/s{seed}'
        family = 'fisher-pruned' if regime != 'reduced' else 'uniformly reduced (MACs-matched)'
        runs.append(common.make_run(
            EXPERIMENT, args.root, path, regime,
            {'family': f"{settings['model']} {family}", 'budget': budget, 'seed': seed},
            criterion='fisher', selection='macs', target_macs=budget, schedule='iterative',
            prune_every=args.prune_every, seed=seed, **settings))
  return runs


if __name__ == '__main__':
  common.main(EXPERIMENT, plan, extra_flags=extra_flags, description=__doc__)
