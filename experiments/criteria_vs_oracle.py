r"""[M]'s rank agreement: Spearman's rho of every criterion against the oracle on a trained network.

    python -m experiments.criteria_vs_oracle --scale=mini --root=runs/exp
    python -m experiments.criteria_vs_oracle --scale=full --root=gs://BUCKET/exp --data_dir=...

Per seed, the baseline comes from the pipeline's baseline stage (shared with the
other experiments through ROOT/baselines/); every criterion, the oracle included,
scores it on the same `--batches` unaugmented training batches (`criteria.score`),
and `agreement` gives rho per layer, its mean over layers, and rho over all
channels pooled with and without per-layer L2 normalisation. Written to
ROOT/criteria_vs_oracle/MODEL/sSEED/agreement.json for `experiments.report`.
[M] (arXiv v1, VGG-16 on Birds-200, per layer / all layers): weight 0.27 / 0.33,
activation mean 0.56 / 0.64, std 0.57 / 0.66, Taylor 0.73 / 0.73.
mini: resnet8 (baselines shared with random_vs_criterion); full: vgg16 on CIFAR-10 (not [M]'s fine-grained datasets).
"""

import json
import os
import time

from absl import flags

from experiments import common

EXPERIMENT = 'criteria_vs_oracle'
CRITERIA = ('taylor', 'taylor_signed_mean', 'taylor_abs_elementwise', 'taylor_fo', 'fisher',
            'second_order', 'min_weight', 'l1', 'l2', 'bn_scale', 'mean_activation',
            'activation_std', 'apoz', 'random')
DEFAULTS = {'mini': {'model': 'resnet8'}, 'full': {'model': 'vgg16'}}


def plan(args) -> list:
  """One (config, workdir) per seed; the config only describes the baseline."""
  from jaxprune import pipeline
  settings = common.base_settings(args, **DEFAULTS)
  planned = []
  for seed in common.seeds_of(args):
    workdir = os.path.join(args.root, EXPERIMENT, f"{settings['model']}/s{seed}")
    config = pipeline.make(
        workdir=workdir, seed=seed,
        baseline_dir=common.baseline_dir(args.root, dict(settings, seed=seed)), **settings)
    planned.append((config, workdir))
  return planned


def measure(config, criteria_names, batches: int) -> dict:
  import numpy as np
  from jaxprune import pipeline
  from jaxprune.prune import agreement, criteria, program
  data = pipeline.load_data(config)
  dataset = data.dataset
  # The pipeline's own baseline stage (resumable, shared through baseline_dir).
  baseline = pipeline.baseline(config, data)
  model, variables, base = baseline.model, baseline.variables, baseline.result
  prog = program.derive(model, dataset.image_shape)
  from jaxprune.errors import ConfigError
  scores, skipped = {}, {}
  for name in ('oracle',) + tuple(criteria_names):
    t = time.time()
    try:
      scores[name] = criteria.score(
          name, prog, variables,
          pipeline.scoring_batches(dataset, config.batch_size, batches, config.seed),
          rng=config.seed)
    except ConfigError as error:  # e.g. bn_scale on a model whose fc has no BatchNorm
      skipped[name] = str(error)
      print(f'  {name}: skipped ({error})', flush=True)
      continue
    print(f'  {name}: {time.time() - t:.1f}s', flush=True)
  out = {}
  for name in criteria_names:
    if name in skipped:
      continue
    a = agreement.agreement(scores[name], scores['oracle'], normalize=True)
    out[name] = {'per_layer': {g: _finite(r) for g, r in sorted(a.per_layer.items())},
                 'mean_per_layer': _finite(a.mean_per_layer),
                 'across_layers_normalized': _finite(a.across_layers),
                 'across_layers_raw': _finite(agreement.across_layers(
                     scores[name], scores['oracle'], normalize=False))}
  return {'experiment': EXPERIMENT, 'criteria': out, 'batches': batches, 'skipped': skipped,
          'baseline_test_accuracy': base['test_accuracy'],
          'config': {k: v for k, v in vars(config).items()},
          'channels': {g: int(np.size(s)) for g, s in sorted(scores['oracle'].items())}}


def _finite(x):
  return None if x != x else float(x)


def main(argv=None):
  flag_values = flags.FlagValues()
  common.define_flags(flag_values, DEFAULTS)
  common.define_list_flag(flag_values, 'criteria', 'criterion', CRITERIA)
  flags.DEFINE_integer('batches', 4, 'Scoring batches per criterion.', flag_values=flag_values)
  from jaxprune.errors import exit_on_user_error
  # One sentence, no traceback; every finished agreement.json is already on disk.
  with exit_on_user_error():
    args = common.parse(flag_values, argv, f'python -m experiments.{EXPERIMENT}', __doc__)
    return _plan_and_measure(args)


def _plan_and_measure(args) -> list:
  from jaxprune.errors import ConfigError
  from jaxprune.pipeline import config as config_lib
  # An unknown name stops here, before any baseline trains.
  names = config_lib.parse_list(args.criteria, 'criteria', 'criterion')
  if args.batches < 1:
    raise ConfigError(f'batches must be at least 1, got {args.batches}.', settings=('batches',))
  planned = plan(args)
  print(f'{EXPERIMENT} at scale {args.scale}: {len(planned)} runs under {args.root}')
  for config, workdir in planned:
    data = config.dataset + (f' ({config.max_train} train)' if config.max_train else '')
    print(f'{config.model}/s{config.seed}  model {config.model}  data {data}  baseline '
          f'{config.epochs} epochs (batch {config.batch_size}, lr {config.lr:g}) in '
          f'{config.baseline_dir}  criteria oracle + {",".join(names)}  {args.batches} batches '
          f'of {config.batch_size}  -> {workdir}/agreement.json')
  if args.dry_run:
    return planned
  archive = common.Archive(args.root, args.archive, args.archive_baselines)
  archive.restore()
  common.quiet_logging()
  for i, (config, workdir) in enumerate(planned):
    path = os.path.join(workdir, 'agreement.json')
    if os.path.exists(path):
      print(f'[{i + 1}/{len(planned)}] {path}: finished, skipped')
      continue
    t = time.time()
    result = measure(config, names, args.batches)
    os.makedirs(workdir, exist_ok=True)
    with open(path, 'w') as f:
      json.dump(result, f, indent=1, sort_keys=True)
    archive.keep(workdir)
    archive.keep_baseline(config.baseline_dir)
    print(f'[{i + 1}/{len(planned)}] {path} in {time.time() - t:.0f}s', flush=True)
  return planned


if __name__ == '__main__':
  main()
