r"""Train a baseline, prune it with a criterion, retrain the pruned network in a regime, report.

    python launch.py --criterion=taylor --regime=scratch

Every stage lives in --workdir and resumes after a crash or preemption; rerunning a
finished command only prints its summary. Stored settings: --flagfile=FILE.
"""

import sys

from absl import app, flags, logging

from jaxprune import data, models, pipeline, train
from jaxprune.kernels import compiler
from jaxprune.prune import criteria, select
from jaxprune.errors import exit_on_user_error


def _names(registry) -> str:
  return ', '.join(registry)


FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/default', 'Work directory (local path or gs://).')
flags.DEFINE_string('baseline_dir', None, 'Reuse (or create) the baseline stage here, shared '
                    'by every criterion x regime run with the same baseline settings.')
flags.DEFINE_string('model', 'tiny', f'Model: {_names(models.MODELS)}.')
flags.DEFINE_string('dataset', 'digits', f'Dataset: {_names(data.DATASETS)}. digits is '
                    "scikit-learn's bundled 8x8 handwritten digits (offline).")
flags.DEFINE_string('data_path', None, 'The .npz file for --dataset=npz (keys train_images, '
                    'train_labels, test_images, test_labels; uint8 NHWC).')
flags.DEFINE_string('data_dir', None, 'TFDS data directory holding a prepared cifar10/cifar100.')
flags.DEFINE_integer('max_train', None, 'Train on a fixed random subset of N training '
                     'images (the same N images for every seed).')
flags.DEFINE_string('criterion', 'taylor', f'Importance criterion: {_names(criteria.CRITERIA)}.')
flags.DEFINE_string('selection', 'global_l2', 'Selection policy: ' + '; '.join(
    f'{k} (needs --{pipeline.Config(workdir="", selection=k).target_name()})'
    for k in select.SELECTIONS) + '.')
flags.DEFINE_float('prune_ratio', None, 'Fraction of prunable channels to remove, in [0, 1) '
                   '(default 0.5 for the ratio policies).')
flags.DEFINE_float('target_macs', None, 'Fraction of the MACs to keep, in (0, 1] '
                   '(macs, macs_l2).')
flags.DEFINE_string('preset', None, f'Li et al. preset: {_names(select.PRESETS)}.')
flags.DEFINE_integer('min_channels', 1, 'Channels every group keeps at least.')
flags.DEFINE_integer('round_to', 1, 'Round every group\'s kept channels up to a multiple of '
                     'this (one-shot; e.g. 8: widths that run faster, MACs slightly above '
                     'the target).')
flags.DEFINE_float('flops_penalty', 0.0, 'FLOPs-aware penalty lambda for the global policies '
                   '(1e-3 in Molchanov et al.).')
flags.DEFINE_enum('schedule', 'oneshot', list(pipeline.SCHEDULES),
                  'oneshot: score once and prune; iterative: fine-tune, accumulating the '
                  'criterion, and remove --prune_step channels every --prune_every steps.')
flags.DEFINE_integer('prune_batches', 8, 'Training batches a one-shot data criterion reads.')
flags.DEFINE_integer('prune_every', 10, 'Iterative: fine-tuning steps between removals.')
flags.DEFINE_integer('prune_step', 1, 'Iterative: channels removed at each removal.')
flags.DEFINE_string('regime', 'scratch', f'Retraining regime: {_names(pipeline.REGIME_CHOICES)}.')
flags.DEFINE_integer('epochs', 160, 'Baseline epochs (scratch uses the same; scratch_b scales '
                     'them by the MACs ratio).')
flags.DEFINE_integer('batch_size', 64, 'Global batch size.')
flags.DEFINE_float('lr', 0.1, 'Baseline and from-scratch learning rate.')
flags.DEFINE_string('lr_schedule', 'step', f'Learning-rate schedule: {_names(train.SCHEDULES)} '
                    '(step: x0.1 at 50% and 75% of the epochs).')
flags.DEFINE_float('weight_decay', 1e-4, 'Coupled weight decay.')
flags.DEFINE_float('bn_l1', 0.0, "Network slimming's L1 sparsity on BN scales for the "
                   'baseline (1e-4 for VGG).')
flags.DEFINE_integer('finetune_epochs', 40, 'Epochs of the finetune regime.')
flags.DEFINE_float('finetune_lr', 1e-3, 'Constant learning rate of fine-tuning.')
flags.DEFINE_float('scratch_b_cap', None, 'Cap scratch_b at this multiple of --epochs.')
flags.DEFINE_string('precision', 'float32', 'Compute dtype of every training and evaluation '
                    f'step: {_names(train.PRECISIONS)} (parameters, their updates and the '
                    'optimizer state stay float32; bfloat16 is meant for GPUs and TPUs).')
flags.DEFINE_integer('seed', 0, 'Seed of init, data order and random choices.')
flags.DEFINE_integer('seeds', 1, 'Train this many independent copies (seeds --seed, --seed+1, '
                     '...) in WORKDIR/seed<N> and report mean ± std.')
flags.DEFINE_string('seed_batching', 'auto', 'How --seeds>1 copies train: ' + '; '.join(
    f'{k}: {v}' for k, v in pipeline.SEED_BATCHING.items()) + '.')
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (TPU pods).')
flags.DEFINE_string('compilation_cache_dir', None, 'Persistent compilation cache (local path or '
                    'gs://): runs of the same model and widths load compiled steps instead of '
                    'compiling them. Default: $JAX_COMPILATION_CACHE_DIR if set, else '
                    f"{compiler.DEFAULT_CACHE_DIR}; '' turns it off.")


def config_from_flags() -> pipeline.Config:
  needs_ratio = FLAGS.selection in select.SELECTIONS and (
      select.SELECTIONS[FLAGS.selection].needs == 'ratio')
  ratio = FLAGS.prune_ratio if FLAGS.prune_ratio is not None or not needs_ratio else 0.5
  return pipeline.Config(
      workdir=FLAGS.workdir, baseline_dir=FLAGS.baseline_dir, model=FLAGS.model,
      dataset=FLAGS.dataset, data_path=FLAGS.data_path, data_dir=FLAGS.data_dir,
      max_train=FLAGS.max_train, criterion=FLAGS.criterion, selection=FLAGS.selection,
      prune_ratio=ratio, target_macs=FLAGS.target_macs, preset=FLAGS.preset,
      min_channels=FLAGS.min_channels, round_to=FLAGS.round_to, flops_penalty=FLAGS.flops_penalty,
      schedule=FLAGS.schedule, prune_batches=FLAGS.prune_batches,
      prune_every=FLAGS.prune_every, prune_step=FLAGS.prune_step, regime=FLAGS.regime,
      epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, lr=FLAGS.lr,
      lr_schedule=FLAGS.lr_schedule, weight_decay=FLAGS.weight_decay, bn_l1=FLAGS.bn_l1,
      finetune_epochs=FLAGS.finetune_epochs, finetune_lr=FLAGS.finetune_lr,
      scratch_b_cap=FLAGS.scratch_b_cap, precision=FLAGS.precision, seed=FLAGS.seed)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; all settings are --flags (see --help).")
  if FLAGS.multihost:
    train.initialize_multihost()
  with exit_on_user_error():
    compiler.use_persistent_cache(FLAGS.compilation_cache_dir)
    results = pipeline.run_seeds(config_from_flags(), FLAGS.seeds, FLAGS.seed_batching)
  print(pipeline.format_table(results))
  print(f"results: {FLAGS.workdir}/results.json")


def _quiet_libraries(record) -> bool:
  # Orbax logs every checkpoint write at INFO; the per-epoch progress lines are ours.
  return '/orbax/' not in record.pathname and '/absl/' not in record.pathname


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_quiet_libraries)
  app.run(main)
