r"""The papers' ImageNet recipes: [R]'s ImageNet tables and [M]'s Taylor-FO ResNet-50/101.

    python -m experiments.imagenet --scale=full --root=gs://BUCKET/exp --dry_run

One scale, `full`: ImageNet (imagenet2012, 224x224 crops, 1000 classes) at the budgets of
the papers' code, read with `--dataset=imagenet2012` streamed from array_record
(`jaxprune.stream`). Every baseline is trained as [R]'s ImageNet scripts train from scratch
(the defaults of its `main_E.py`, PyTorch's ImageNet example): 90 epochs, batch 256, SGD
lr 0.1 with momentum 0.9, x0.1 at epochs 30 and 60, weight decay 1e-4. One seed (0), as
the papers ran ImageNet; --seeds adds more. Rows (`--methods`):

* l1: [R]'s L1-norm ResNet-34-A and -B (presets `resnet34_a`, `resnet34_b`: the first conv
  of the blocks that Li et al. prune, per-stage ratios, stage 4 kept); fine-tuned 20 epochs
  at lr 1e-3, scratch-E, scratch-B (capped at 180 epochs).
* slimming: network slimming on [R]'s VGG-11 (`vgg11_bn_fcbn`: BN in the classifier, every
  BN gamma starting at 0.5, Dense layers at N(0, 0.01)), BN-scale sparsity 1e-5 while
  training the baseline, 50 % of all BN channels (conv and classifier) removed by one
  global threshold; fine-tuned 5 epochs at lr 1e-3, scratch-E, scratch-B (90 x the MACs
  ratio, uncapped).
* thinet: ThiNet-30/50/70 on ResNet-50, the architectures [R] trains from scratch: every
  bottleneck's two inner widths keep 30 / 50 / 70 % (selection layer, the channels chosen
  by L1, which from scratch is only the widths); scratch-E and scratch-B (capped at 180
  epochs).
* weight: weight-level magnitude pruning of VGG-16-BN and ResNet-50, every conv weight
  under one global |w| threshold at 30 % and 60 %; fine-tuned 10 epochs at lr 1e-3,
  scratch-E, scratch-B (90 x the MACs ratio of the kept weights, uncapped).
* taylor: [M]'s Taylor-FO on ResNet-50 (91, 81, 72, 56 % of its gates kept) and ResNet-101
  (75, 55, 50, 40 %): iterative, 100 channels every 30 steps by the global, unnormalised
  ranking, fine-tuning at lr 1e-3 throughout; 25 epochs in all (the pruning stage's epoch
  and 24 of the finetune regime).

What the settings cannot say, and [R]'s rows that cannot be planned (the
regression-pruning and sparse-structure-selection models, ThiNet's VGG-16 models):
experiments/README.md, "ImageNet recipes".
"""

from absl import flags

from experiments import common

EXPERIMENT = 'imagenet'
SCALES = ('full',)
METHODS = ('l1', 'slimming', 'thinet', 'weight', 'taylor')
# [R]'s from-scratch ImageNet recipe (its main_E.py defaults).
DEFAULTS = {'full': dict(dataset='imagenet2012', epochs=90, batch_size=256, lr=0.1,
                         lr_decay_epochs='30,60', weight_decay=1e-4)}
# The papers ran ImageNet once.
SEEDS = (0,)
# [R]'s scratch-B caps at 180 epochs (2x) in its L1-norm, ThiNet and regression-pruning
# code, not in its network-slimming and weight-level code.
CAP = 2.0
# [R]'s fine-tuning (main_finetune.py defaults): epochs at a constant lr 1e-3.
FINETUNE_EPOCHS = {'l1': 20, 'slimming': 5, 'weight': 10}
# [M]'s configs (NVlabs/Taylor_pruning configs/imagenet_resnet*_prune*.json): the gates kept
# (the file name's percentage) and prune_neurons_max, the channels removed in all.
TAYLOR = {'resnet50': ((91, 1000), (81, 2200), (72, 3200), (56, 5500)),
          'resnet101': ((75, 5000), (55, 9000), (50, 10000), (40, 12000))}
TAYLOR_SETTINGS = dict(criterion='taylor_fo', selection='global', schedule='iterative',
                       prune_every=30, prune_step=100, finetune_lr=1e-3,
                       finetune_epochs=24)


def taylor_gates(model: str) -> int:
  """[M]'s gates in a ResNet: every block's inner channels and every stage's stream (the
  skip-connection gates), the stem's excepted."""
  from jaxprune import models
  return sum(w for g, w in models.MODELS[model]().default_widths().items() if g != 'stem')


def rows() -> list[tuple[str, str, str, dict, tuple[str, ...]]]:
  """(method, model, tag, settings, regimes) of every planned recipe."""
  out = [('l1', 'resnet34', preset[-1].upper(),
          dict(criterion='l1', selection='preset', preset=preset,
               finetune_epochs=FINETUNE_EPOCHS['l1'], finetune_lr=1e-3, scratch_b_cap=CAP),
          ('finetune', 'scratch', 'scratch_b'))
         for preset in ('resnet34_a', 'resnet34_b')]
  out += [('slimming', 'vgg11_bn_fcbn', '0.5',
          dict(criterion='bn_scale', selection='slimming', prune_ratio=0.5, bn_l1=1e-5,
               bn_scale_init=0.5, dense_init='normal_0.01',
               finetune_epochs=FINETUNE_EPOCHS['slimming'], finetune_lr=1e-3),
          ('finetune', 'scratch', 'scratch_b'))]
  for kept, removed in ((30, 0.7), (50, 0.5), (70, 0.3)):
    out.append(('thinet', 'resnet50', f'thinet{kept}',
                dict(criterion='l1', selection='layer', prune_ratio=removed, scratch_b_cap=CAP),
                ('scratch', 'scratch_b')))
  for model in ('vgg16_bn', 'resnet50'):
    init = dict(dense_init='normal_0.01') if model == 'vgg16_bn' else {}
    for ratio in (0.3, 0.6):
      out.append(('weight', model, f'{ratio}',
                  dict(criterion='l1', selection='global', granularity='weight',
                       prune_ratio=ratio, finetune_epochs=FINETUNE_EPOCHS['weight'],
                       finetune_lr=1e-3, **init),
                  ('finetune', 'scratch', 'scratch_b')))
  for model, budgets in TAYLOR.items():
    for kept, removed in budgets:
      out.append(('taylor', model, f'{kept}pct',
                  dict(TAYLOR_SETTINGS, prune_ratio=removed / taylor_gates(model)),
                  ('finetune',)))
  return out


def extra_flags(flag_values):
  flags.DEFINE_string('methods', ','.join(METHODS),
                      'Comma-separated rows to plan: l1 ([R]: L1-norm ResNet-34-A/B), '
                      'slimming ([R]: network slimming, VGG-11), '
                      'thinet ([R]: ThiNet-30/50/70 from scratch, ResNet-50), weight ([R]: '
                      'weight-level, VGG-16-BN and ResNet-50), taylor ([M]: Taylor-FO, '
                      'ResNet-50/101).', flag_values=flag_values)


def plan(args) -> list:
  from jaxprune.errors import ConfigError
  if args.model is not None:
    raise ConfigError(f'model={args.model}: every ImageNet recipe names the network it '
                      'prunes; choose recipes with methods.', settings=('model', 'methods'))
  methods = common.choices_of(args.methods, 'methods', METHODS)
  seeds = common.seeds_of(args) if args.seeds else SEEDS
  runs = []
  for method, model, tag, recipe, regimes in rows():
    if method not in methods:
      continue
    # The recipe's values, under what the command line sets.
    settings = common.base_settings(args, full={**DEFAULTS['full'], 'model': model, **recipe})
    for seed in seeds:
      for regime in regimes:
        path = f'{method}/{model}_{tag}/s{seed}'
        labels = {'method': method, 'preset': f'{model} {tag}', 'seed': seed}
        runs.append(common.make_run(EXPERIMENT, args.root, path, regime, labels, seed=seed,
                                    **settings))
  return runs


if __name__ == '__main__':
  common.main(EXPERIMENT, plan, extra_flags=extra_flags, description=__doc__, defaults=DEFAULTS,
              scales=SCALES)
