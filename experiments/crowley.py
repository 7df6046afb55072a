r"""[C]: Fisher-pruned WideResNets against uniformly reduced WideResNets, both trained from scratch.

    python -m experiments.crowley --scale=mini --root=runs/exp --dry_run

Fisher pruning (criterion fisher, iterative schedule, global ranking without
normalisation as in [C]'s code, `prune_step` channels every `prune_every` steps)
takes the baseline to several MACs budgets; each pruned network is fine-tuned
(`finetune`), its architecture is trained from scratch (`scratch`), and both are
compared with the same family made uniformly thinner to the same MACs
(`reduced`, from scratch). The report plots accuracy against parameters.
full: [C]'s recipe: wrn40_2 on CIFAR-10, 200 epochs, lr 0.1 x0.2 at epochs 60, 120 and
160, batch 128 (training and pruning fine-tune), wd 5e-4, reflect padding for the random
crop, one channel every 100 steps at lr 8e-4; the reduced networks matched on parameters
with the stem fixed at 16 (`reduced_match` params), as [C]'s code does; 5 seeds.
mini: wrn10_1 (the shallowest, thinnest WRN) stands in for wrn40_2; 4 channels
every 10 steps; jaxprune's defaults otherwise (x0.1 at 50 % and 75 %, zero padding),
the reduced networks matched on MACs (stated in the table).
"""

from experiments import common

EXPERIMENT = 'crowley'
BUDGETS = (0.75, 0.5, 0.25)
REGIMES = ('finetune', 'scratch', 'reduced')
PRUNE_EVERY = {'mini': 10, 'full': 100}
PRUNE_STEP = {'mini': 4, 'full': 1}
DEFAULTS = {'mini': {'model': 'wrn10_1'},
            'full': {'model': 'wrn40_2', 'epochs': 200, 'batch_size': 128, 'lr': 0.1,
                     'lr_decay_epochs': '60,120,160', 'lr_decay_factor': 0.2,
                     'weight_decay': 5e-4, 'pad_mode': 'reflect', 'finetune_lr': 8e-4,
                     'reduced_match': 'params'}}


def extra_flags(flag_values):
  common.define_list_flag(flag_values, 'budgets', 'target_macs', BUDGETS)
  common.define_list_flag(flag_values, 'regimes', 'regime', REGIMES)
  common.define_setting_flags(flag_values, {
      'prune_every': f"{PRUNE_EVERY['mini']} (mini), {PRUNE_EVERY['full']} (full)",
      'prune_step': f"{PRUNE_STEP['mini']} (mini), {PRUNE_STEP['full']} (full)"})


def plan(args) -> list:
  from jaxprune.pipeline import config
  settings = common.base_settings(args, **DEFAULTS)
  prune_every = PRUNE_EVERY[args.scale] if args.prune_every is None else args.prune_every
  prune_step = PRUNE_STEP[args.scale] if args.prune_step is None else args.prune_step
  runs = []
  for seed in common.seeds_of(args):
    for budget in config.parse_list(args.budgets, 'budgets', 'target_macs'):
      for regime in config.parse_list(args.regimes, 'regimes', 'regime'):
        path = f'fisher/macs{budget:.2f}/s{seed}'
        match = settings.get('reduced_match', 'macs')
        family = (f"uniformly reduced ({'MACs' if match == 'macs' else 'params'}-matched)"
                  if regime == 'reduced' else 'fisher-pruned')
        runs.append(common.make_run(
            EXPERIMENT, args.root, path, regime,
            {'family': f"{settings['model']} {family}", 'budget': budget, 'seed': seed},
            criterion='fisher', selection='macs', target_macs=budget, schedule='iterative',
            prune_every=prune_every, prune_step=prune_step, seed=seed, **settings))
  return runs


if __name__ == '__main__':
  common.main(EXPERIMENT, plan, extra_flags=extra_flags, description=__doc__, defaults=DEFAULTS)
