r"""`train.fit`'s epochs against steps x its pure train-step time, on a synthetic CIFAR-shaped
set on the device (target: training phase <= 1.05x; bench README, section 5).
"""

import tempfile

import jax
import numpy as np
from absl import flags, logging

import common
from jaxprune import data, models, train
from jaxprune.train import checkpoint

FLAGS = flags.FLAGS
flags.DEFINE_string('model', 'resnet20', 'Model.')
flags.DEFINE_integer('batch_size', 128, 'Batch size.', lower_bound=1)
flags.DEFINE_integer('steps_per_epoch', 12, 'Training batches per epoch.', lower_bound=1)
flags.DEFINE_integer('test_size', 512, 'Test images (evaluated after every epoch).', lower_bound=1)
flags.DEFINE_integer('epochs', 4, 'Epochs of fit (the first is excluded from the medians).',
                     lower_bound=1)
flags.DEFINE_integer('reps', 8, 'Pure-step repetitions before and after the fit (each).',
                     lower_bound=1)
flags.DEFINE_string('out', None, 'Write the table as JSON here.')


def main():
  logging.set_verbosity(logging.WARNING)
  rng = np.random.default_rng(0)
  n_train, n_test = FLAGS.steps_per_epoch * FLAGS.batch_size, FLAGS.test_size
  ds = data.Dataset(
      name='synthetic', num_classes=10,
      train_images=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
      train_labels=rng.integers(0, 10, n_train).astype(np.int32),
      test_images=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
      test_labels=rng.integers(0, 10, n_test).astype(np.int32),
      mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
  arrays = data.device_put_dataset(ds)
  model = models.build(FLAGS.model)
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  options = train.TrainOptions(epochs=FLAGS.epochs, batch_size=FLAGS.batch_size)
  mesh = train.make_mesh()
  trainer = train.trainer_for(model, options.optimizer, None, mesh, options.precision)

  # The pure step, on one batch made the way fit makes its batches.
  order = data.epoch_permutation(jax.random.key(1), n_train, FLAGS.batch_size)
  batch = jax.jit(data.train_batch, static_argnums=4)(
      arrays['train_images'], arrays['train_labels'], order[0], jax.random.key(2), ds.spec)
  step = common.stepper(trainer, variables, jax.device_get(batch),
                        train.learning_rates(options.optimizer, FLAGS.epochs,
                                             FLAGS.steps_per_epoch)[0])
  with common.CompileLog() as compiles:
    _, before, _ = common.step_times(step, 1, FLAGS.reps)
  with tempfile.TemporaryDirectory() as stage:
    fit_wall, (fitted, _) = common.timed(lambda: train.fit(
        model, variables, arrays, ds.spec, options, stage_dir=stage, seed=0, mesh=mesh))
    records = checkpoint.read_metrics(stage)
  _, after, _ = common.step_times(step, 0, FLAGS.reps)
  eval_s, _ = common.timed(lambda: train.evaluate_variables(
      model, fitted, arrays, ds.spec, batch_size=FLAGS.batch_size, precision=options.precision,
      mesh=mesh))

  pure = common.median(before + after)
  expected = FLAGS.steps_per_epoch * pure
  rows, previous = [], 0.0
  for r in records:
    train_s = n_train / r['images_per_second']
    epoch_s, previous = r['elapsed_s'] - previous, r['elapsed_s']
    rows.append({'epoch': r['epoch'], 'train_phase_s': train_s, 'epoch_s': epoch_s,
                 'steps_x_pure_s': expected, 'train_ratio': train_s / expected,
                 'epoch_ratio': epoch_s / expected})
  steady = rows[1:] or rows
  summary = {
      'model': FLAGS.model, 'batch': FLAGS.batch_size, 'steps_per_epoch': FLAGS.steps_per_epoch,
      'pure_step_ms': pure * 1e3,
      'pure_step_ms_before_after': [common.median(before) * 1e3, common.median(after) * 1e3],
      'train_ratio': common.median([r['train_ratio'] for r in steady]),
      'epoch_ratio': common.median([r['epoch_ratio'] for r in steady]),
      'evaluate_s': eval_s, 'step_compile_s': compiles.seconds(), 'fit_wall_s': fit_wall}
  print(f"\n{FLAGS.model}, batch {FLAGS.batch_size}, {FLAGS.steps_per_epoch} steps/epoch, "
        f"{n_test} test images, backend {jax.default_backend()}; pure step {pure * 1e3:.0f} ms "
        "(median before / after the fit: {:.0f} / {:.0f} ms)".format(
            *summary['pure_step_ms_before_after']))
  print(common.format_table(rows))
  print(f"\nmedian over epochs 2..{FLAGS.epochs}: train phase {summary['train_ratio']:.3f}x, "
        f"whole epoch {summary['epoch_ratio']:.3f}x steps x pure step (target train phase "
        f"<= 1.05x)\ntest-set evaluation, as at the end of every epoch: {eval_s:.2f} s")
  common.write_json(FLAGS.out, summary=summary, rows=rows)


if __name__ == '__main__':
  common.run(main)
