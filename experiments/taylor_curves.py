r"""[M]'s accuracy during iterative pruning, per criterion (Taylor, its variants and the baselines).

    python -m experiments.taylor_curves --scale=mini --root=runs/exp --dry_run

Each criterion prunes the same baseline iteratively (`--schedule=iterative`:
fine-tune at a constant small lr, accumulate the criterion, remove `prune_step`
channels every `prune_every` steps, global ranking after per-layer L2
normalisation, `global_l2`), down to `prune_ratio` of the prunable channels
removed, then fine-tunes. The report reads each prune stage's
prune/finetune/metrics.jsonl (test accuracy per epoch) and the removal schedule,
and plots accuracy against the fraction of channels removed; the final MACs come
from prune/record.json. The pipeline keeps only the final masks, so MACs at
intermediate epochs are not known exactly and are not plotted.
full: vgg16 on CIFAR-10 (stand-in for [M]'s ImageNet-pretrained VGG-16 on
Birds/Flowers, which jaxprune does not load), fine-tune lr 1e-4, 5 seeds.
mini: tiny, prune_every 10, prune_step 1.
"""

from experiments import common

EXPERIMENT = 'taylor_curves'
CRITERIA = ('taylor', 'taylor_fo', 'fisher', 'min_weight', 'mean_activation',
            'activation_std', 'random')
DEFAULTS = {'mini': {'model': 'tiny'}, 'full': {'model': 'vgg16', 'finetune_lr': 1e-4}}


def extra_flags(parser):
  parser.add_argument('--criteria', default=','.join(CRITERIA))
  parser.add_argument('--prune_ratio', type=float, default=0.5)
  parser.add_argument('--prune_every', type=int, default=10)
  parser.add_argument('--prune_step', type=int, default=1)


def plan(args) -> list:
  settings = common.base_settings(args, **DEFAULTS)
  runs = []
  for seed in common.seeds_of(args):
    for criterion in common.csv_list(args.criteria):
      path = f'{criterion}/s{seed}'
      runs.append(common.make_run(
          EXPERIMENT, args.root, path, 'finetune', {'criterion': criterion, 'seed': seed},
          criterion=criterion, selection='global_l2', schedule='iterative',
          prune_ratio=args.prune_ratio, prune_every=args.prune_every,
          prune_step=args.prune_step, seed=seed, **settings))
  return runs


if __name__ == '__main__':
  common.main(EXPERIMENT, plan, extra_flags=extra_flags, description=__doc__)
