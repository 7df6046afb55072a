r"""[M]'s accuracy during iterative pruning, per criterion, with two amounts of fine-tuning.

    python -m experiments.taylor_curves --scale=mini --root=runs/exp --dry_run

Each criterion prunes the same baseline iteratively (`--schedule=iterative`:
fine-tune at a constant small lr, accumulate the criterion, remove `prune_step`
channels every `prune_every` steps, global ranking after per-layer L2
normalisation, `global_l2`), down to `prune_ratio` of the prunable channels
removed, then fine-tunes. Each criterion runs once per amount of fine-tuning
between removals (`--prune_every`, [M]: 10 and 30 updates). The report reads each
prune stage's `prune/finetune/pruning_curve.jsonl` (per epoch: test accuracy,
channels removed and the exact MACs of the masked network) and plots accuracy
against the MACs kept.
full: vgg16 on CIFAR-10 (stand-in for [M]'s ImageNet-pretrained VGG-16 on
Birds/Flowers, which jaxprune does not load), [M]'s fine-tuning: lr 1e-4, momentum 0.9,
wd 1e-4, batch 32; prune_step 1, 5 seeds.
mini: resnet8 (baselines shared with random_vs_criterion), prune_step 8 (a run
removes half of resnet8's 112 prunable channels in 7 removals).
"""

from experiments import common

EXPERIMENT = 'taylor_curves'
CRITERIA = ('taylor', 'min_weight', 'mean_activation', 'fisher', 'random')
PRUNE_EVERY = (10, 30)
PRUNE_STEP = {'mini': 8, 'full': 1}
PRUNE_RATIO = 0.5
DEFAULTS = {'mini': {'model': 'resnet8'},
            'full': {'model': 'vgg16', 'finetune_lr': 1e-4, 'finetune_batch_size': 32}}


def extra_flags(flag_values):
  common.define_list_flag(flag_values, 'criteria', 'criterion', CRITERIA)
  common.define_list_flag(flag_values, 'prune_every', 'prune_every', PRUNE_EVERY)
  common.define_setting_flags(flag_values, {
      'prune_ratio': str(PRUNE_RATIO),
      'prune_step': f"{PRUNE_STEP['mini']} (mini), {PRUNE_STEP['full']} (full)"})


def plan(args) -> list:
  from jaxprune.pipeline import config
  settings = common.base_settings(args, **DEFAULTS)
  prune_step = PRUNE_STEP[args.scale] if args.prune_step is None else args.prune_step
  prune_ratio = PRUNE_RATIO if args.prune_ratio is None else args.prune_ratio
  runs = []
  for seed in common.seeds_of(args):
    for every in config.parse_list(args.prune_every, 'prune_every', 'prune_every'):
      for criterion in config.parse_list(args.criteria, 'criteria', 'criterion'):
        path = f'{criterion}/every{every}/s{seed}'
        runs.append(common.make_run(
            EXPERIMENT, args.root, path, 'finetune',
            {'criterion': criterion, 'prune_every': every, 'seed': seed},
            criterion=criterion, selection='global_l2', schedule='iterative',
            prune_ratio=prune_ratio, prune_every=every, prune_step=prune_step,
            seed=seed, **settings))
  return runs


if __name__ == '__main__':
  common.main(EXPERIMENT, plan, extra_flags=extra_flags, description=__doc__, defaults=DEFAULTS)
