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
mini (stand-ins, stated in the table): Li et al.'s presets exist only for the
full-size models, so mini prunes resnet8 per layer by l1 at ratio 0.5 (`layer`,
the inner convolution of every block, as the ResNet presets do) as the L1
stand-in, and slims preresnet11, the shallowest PreResNet (bn_l1 1e-5,
percent 0.4), standing in for PreResNet-164.
midi ([R]'s L1 comparison on the full CIFAR-10 at a CPU's budget): VGG-11 (the single-Dense
head, BN scales initialised to 1) at half width, 15 epochs, batch 64, lr 0.1 with x0.1 at
50 % and 75 %, wd 1e-4, standard augmentation; every conv pruned by 50 % by l1 (`layer`);
fine-tune 3 epochs at 1e-3, scratch-E 15 epochs, scratch-B 15 x the MACs ratio, uncapped;
seeds 0 and 1; no lottery row.
"""

from experiments import common

EXPERIMENT = 'rethinking'
REGIMES = ('finetune', 'scratch', 'scratch_b', 'lottery')
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
)
# [R]'s code where it is not jaxprune's default (full scale): per model, and for every row.
_R_VGG = dict(bn_scale_init=0.5, dense_init='normal_0.01')
_R_RESNET = dict(resnet_shortcut='avgpool_detached')
FULL_CODE = {'vgg16_mlp': _R_VGG, 'vgg19': _R_VGG, 'resnet56': _R_RESNET,
             'resnet110': _R_RESNET, 'preresnet164': dict(bn_scale_init=0.5),
             'densenet40': dict(bn_scale_init=0.5)}
FULL_CODE_L1 = dict(lottery_style='mask')
MINI = (
    ('l1 (per-layer 0.5 stand-in for the presets)', 'resnet8', 'l1', 'layer', 0.5, 0.0),
    ('slimming (preresnet11 stand-in for preresnet164)', 'preresnet11', 'bn_scale',
     'slimming', 0.4, 1e-5),
)
MIDI = (('l1 (every conv 50 % per layer)', 'vgg11', 'l1', 'layer', 0.5, 0.0),)
ROWS = {'mini': MINI, 'midi': MIDI, 'full': FULL}
MIDI_REGIMES = ('finetune', 'scratch', 'scratch_b')
SCALES = ('mini', 'midi', 'full')


def extra_flags(parser):
  from jaxprune.pipeline import config
  config.add_list_argument(parser, 'regimes', 'regime',
                           {'mini': REGIMES, 'midi': MIDI_REGIMES, 'full': REGIMES})


def plan(args) -> list:
  from jaxprune.pipeline import config
  runs = []
  regimes = (config.parse_list(args.regimes, 'regimes', 'regime') if args.regimes else
             MIDI_REGIMES if args.scale == 'midi' else REGIMES)
  for method, model, criterion, selection, target, bn_l1 in ROWS[args.scale]:
    args_model = args.model
    args.model = None  # each row has its own model
    settings = common.base_settings(args, **{scale: {'model': model} for scale in SCALES})
    args.model = args_model
    settings['bn_l1'] = bn_l1
    if args.scale == 'full':
      settings.update(FULL_CODE[model], **(FULL_CODE_L1 if method == 'l1' else {}))
    key = {'ratio': 'prune_ratio', 'preset': 'preset'}[
        'preset' if selection == 'preset' else 'ratio']
    for seed in common.seeds_of(args):
      for regime in regimes:
        tag = method.split(' ')[0]
        path = f'{tag}/{model}_{target}/s{seed}'
        labels = {'method': method, 'preset': f'{model} {target}', 'seed': seed}
        runs.append(common.make_run(EXPERIMENT, args.root, path, regime, labels,
                                    criterion=criterion, selection=selection, seed=seed,
                                    **{key: target}, **settings))
  return runs


if __name__ == '__main__':
  common.main(EXPERIMENT, plan, extra_flags=extra_flags, description=__doc__, scales=SCALES)
