r"""[R]'s CIFAR tables: L1-norm presets and network slimming, each pruned network retrained four ways.

    python -m experiments.rethinking --scale=mini --root=runs/exp --dry_run
    python -m experiments.rethinking --scale=full --root=gs://BUCKET/exp --data_dir=...

Rows: the unpruned baseline, fine-tuned, scratch-E, scratch-B and lottery ([R]'s
"unpruned / fine-tuned / scratch-E / scratch-B" plus the lottery-ticket comparison).
full: L1 presets VGG-16-A (vgg16_mlp: pool -> Dense 512 -> BN -> ReLU -> Dense, [R]'s
L1-norm VGG), ResNet-56-A/B (resnet56), ResNet-110-A/B (resnet110) with criterion l1 and
selection preset; network slimming on VGG-19 (bn_l1 1e-4, percent 0.7), PreResNet-164 and
DenseNet-40 (bn_l1 1e-5, 0.4 and 0.6): criterion bn_scale, selection slimming. 160 epochs,
batch 64, lr 0.1, 5 seeds. As [R]'s code (`FULL_CODE`): every BN gamma starts at 0.5 in
the VGGs, PreResNet-164 and DenseNet-40 (1 in the ResNets), the VGGs' Dense layers at
N(0, 0.01) with zero bias; the ResNets' downsampling shortcut is a 2x2 average pool +
zero-pad with no gradient through it (`resnet_shortcut` avgpool_detached); the L1 rows'
lottery keeps the full network with the removed filters held at zero (`lottery_style`
mask). [R]'s lottery code covers L1-norm pruning only: the slimming rows' lottery is
jaxprune's sliced one (their PreResNet and DenseNet groups are channel selections, which
no conv filter produces).
Weight-level rows ([R] section 5, its `cifar/weight-level/` code): VGG-19, PreResNet-110
(bottleneck, as that code builds depth 110) and densenet100_c (depth 100, compression 2,
no bottleneck: that code's DenseNet-BC-100), baselines with every BN gamma at 1 (the VGG's
Dense at N(0, 0.01)); every conv weight pruned by one global |w| threshold at 30 % and
80 % (`granularity` weight, selection global); fine-tuned, scratch-E and scratch-B only, as
that code trains. Scratch-B's epochs are 160 x the MACs ratio of the nonzero weights;
[R]'s code divides FLOPs that also count BN, ReLU and pooling operations, which pruning
does not remove, so its ratio (and its scratch-B) is slightly smaller.
mini (stand-ins, stated in the table): Li et al.'s presets exist only for the
full-size models, so mini prunes resnet8 per layer by l1 at ratio 0.5 (`layer`,
the inner convolution of every block, as the ResNet presets do) as the L1
stand-in, and slims preresnet11, the shallowest PreResNet (bn_l1 1e-5,
percent 0.4), standing in for PreResNet-164; the weight-level row prunes the L1 row's
resnet8 baseline by one global |w| threshold at 80 %.
midi ([R]'s L1 comparison on the full CIFAR-10 at a CPU's budget): VGG-11 (the single-Dense
head, BN scales initialised to 1) at half width, 15 epochs, batch 64, lr 0.1 with x0.1 at
50 % and 75 %, wd 1e-4, standard augmentation; every conv pruned by 50 % by l1 (`layer`);
fine-tune 3 epochs at 1e-3, scratch-E 15 epochs, scratch-B 15 x the MACs ratio, uncapped;
seeds 0 and 1; no lottery row.
"""

from absl import flags

from experiments import common

EXPERIMENT = 'rethinking'
REGIMES = ('finetune', 'scratch', 'scratch_b', 'lottery')
# [R]'s weight-level (non-structured) rows: 30 % is its code's README example; 80 % the
# sparse end of its weight-level table.
WEIGHT_RATIOS = (0.3, 0.8)
FULL = (  # (method, model, criterion, selection, target, bn_l1)
    ('l1', 'vgg16_mlp', 'l1', 'preset', 'vgg16_a', 0.0),
    ('l1', 'resnet56', 'l1', 'preset', 'resnet56_a', 0.0),
    ('l1', 'resnet56', 'l1', 'preset', 'resnet56_b', 0.0),
    ('l1', 'resnet110', 'l1', 'preset', 'resnet110_a', 0.0),
    ('l1', 'resnet110', 'l1', 'preset', 'resnet110_b', 0.0),
    ('slimming', 'vgg19', 'bn_scale', 'slimming', 0.7, 1e-4),
    ('slimming', 'preresnet164', 'bn_scale', 'slimming', 0.4, 1e-5),
    ('slimming', 'preresnet164', 'bn_scale', 'slimming', 0.6, 1e-5),
    ('slimming', 'densenet40', 'bn_scale', 'slimming', 0.4, 1e-5),
    ('slimming', 'densenet40', 'bn_scale', 'slimming', 0.6, 1e-5),
    *(('weight', model, 'l1', 'global', ratio, 0.0)
      for model in ('vgg19', 'preresnet110', 'densenet100_c') for ratio in WEIGHT_RATIOS),
)
# [R]'s code where it is not jaxprune's default (full scale): per model, and for every row.
_R_VGG = dict(bn_scale_init=0.5, dense_init='normal_0.01')
_R_RESNET = dict(resnet_shortcut='avgpool_detached')
FULL_CODE = {'vgg16_mlp': _R_VGG, 'vgg19': _R_VGG, 'resnet56': _R_RESNET,
             'resnet110': _R_RESNET, 'preresnet164': dict(bn_scale_init=0.5),
             'densenet40': dict(bn_scale_init=0.5)}
FULL_CODE_L1 = dict(lottery_style='mask')
# [R]'s weight-level code: BN gammas start at 1 in every model, the VGG's Linear at N(0, 0.01).
FULL_CODE_WEIGHT = {'vgg19': dict(dense_init='normal_0.01'), 'preresnet110': {},
                    'densenet100_c': {}}
WEIGHT_REGIMES = ('finetune', 'scratch', 'scratch_b')  # [R]'s weight-level code trains these
MINI = (
    ('l1 (per-layer 0.5 stand-in for the presets)', 'resnet8', 'l1', 'layer', 0.5, 0.0),
    ('slimming (preresnet11 stand-in for preresnet164)', 'preresnet11', 'bn_scale',
     'slimming', 0.4, 1e-5),
    ('weight (global |w| 0.8, resnet8 stand-in)', 'resnet8', 'l1', 'global', 0.8, 0.0),
)
MIDI = (('l1 (every conv 50 % per layer)', 'vgg11', 'l1', 'layer', 0.5, 0.0),)
ROWS = {'mini': MINI, 'midi': MIDI, 'full': FULL}
MIDI_REGIMES = ('finetune', 'scratch', 'scratch_b')
SCALES = ('mini', 'midi', 'full')


METHODS = ('l1', 'slimming', 'weight')


def extra_flags(flag_values):
  common.define_list_flag(flag_values, 'regimes', 'regime',
                          {'mini': REGIMES, 'midi': MIDI_REGIMES, 'full': REGIMES})
  flags.DEFINE_string('methods', ','.join(METHODS),
                      "Comma-separated rows to plan, by method: l1 (Li et al.'s L1-norm "
                      'pruning), slimming (network slimming), weight (weight-level magnitude '
                      'pruning).', flag_values=flag_values)


def plan(args) -> list:
  from jaxprune.pipeline import config
  runs = []
  regimes = (config.parse_list(args.regimes, 'regimes', 'regime') if args.regimes else
             MIDI_REGIMES if args.scale == 'midi' else REGIMES)
  methods = common.choices_of(args.methods, 'methods', METHODS)
  for method, model, criterion, selection, target, bn_l1 in ROWS[args.scale]:
    if method.split(' ')[0] not in methods:
      continue
    args_model = args.model
    args.model = None  # each row has its own model
    settings = common.base_settings(args, **{scale: {'model': model} for scale in SCALES})
    args.model = args_model
    settings['bn_l1'] = bn_l1
    tag = method.split(' ')[0]
    if tag == 'weight':
      settings['granularity'] = 'weight'
    if args.scale == 'full':
      settings.update(FULL_CODE_WEIGHT[model] if tag == 'weight' else FULL_CODE[model],
                      **(FULL_CODE_L1 if method == 'l1' else {}))
    key = {'ratio': 'prune_ratio', 'preset': 'preset'}[
        'preset' if selection == 'preset' else 'ratio']
    row_regimes = [r for r in regimes if tag != 'weight' or r in WEIGHT_REGIMES]
    for seed in common.seeds_of(args):
      for regime in row_regimes:
        path = f'{tag}/{model}_{target}/s{seed}'
        labels = {'method': method, 'preset': f'{model} {target}', 'seed': seed}
        runs.append(common.make_run(EXPERIMENT, args.root, path, regime, labels,
                                    criterion=criterion, selection=selection, seed=seed,
                                    **{key: target}, **settings))
  return runs


if __name__ == '__main__':
  common.main(EXPERIMENT, plan, extra_flags=extra_flags, description=__doc__, scales=SCALES)
