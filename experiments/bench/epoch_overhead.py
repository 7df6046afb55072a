r"""End-to-end epoch time of `train.fit` against steps x the pure train-step time.

    python experiments/bench/epoch_overhead.py --out=epoch_overhead.json

On a synthetic CIFAR-shaped dataset held on the device (uint8, --steps_per_epoch full
batches), it measures, through the public training API only,
  pure    the median time of `Trainer.train_step` on one batch made by `data.train_batch`
          (the Trainer `fit` uses: `train.trainer_for` with fit's key, so fit compiles
          nothing new for it), measured before and after the fit and pooled;
  fit     `train.fit` for --epochs epochs: per epoch the training phase (fit's own
          `images_per_second`: from the epoch's first step to its one device sync) and
          the whole epoch (the `elapsed_s` difference: + test-set evaluation, the
          checkpoint and metrics.jsonl). The first epoch (compiling the batch maker,
          the evaluation step, the first checkpoint) is reported but not in the medians;
  eval    one `train.evaluate_variables` of the test set, the evaluation every epoch ends with.
Target: the training phase <= 1.05 x steps x pure step.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import flags, logging  # noqa: E402

import common  # noqa: E402

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


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxprune import data, models, train
  from jaxprune.train import checkpoint

  rng = np.random.default_rng(0)
  n_train = FLAGS.steps_per_epoch * FLAGS.batch_size
  ds = data.Dataset(
      name='synthetic', num_classes=10,
      train_images=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
      train_labels=rng.integers(0, 10, n_train).astype(np.int32),
      test_images=rng.integers(0, 256, (FLAGS.test_size, 32, 32, 3), dtype=np.uint8),
      test_labels=rng.integers(0, 10, FLAGS.test_size).astype(np.int32),
      mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
  arrays = data.device_put_dataset(ds)
  model = models.build(FLAGS.model)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  options = train.TrainOptions(epochs=FLAGS.epochs, batch_size=FLAGS.batch_size)
  mesh = train.make_mesh()
  trainer = train.trainer_for(model, options.optimizer, None, mesh, options.precision)
  learning_rate = train.learning_rates(options.optimizer, FLAGS.epochs,
                                       FLAGS.steps_per_epoch)[0]

  # The pure step, on one batch made the way fit makes its batches.
  order = data.epoch_permutation(jax.random.key(1), n_train, FLAGS.batch_size)
  batch = jax.jit(data.train_batch, static_argnums=4)(
      arrays['train_images'], arrays['train_labels'], order[0], jax.random.key(2), ds.spec)
  batch = trainer.shard_batch(jax.device_get(batch))
  state = trainer.init_state(variables, seed=1)
  with common.CompileLog() as compiles:
    state, metrics = trainer.train_step(state, batch, None, learning_rate)
    common.block(state)
  compile_s = compiles.seconds()

  def pure_steps(state, reps):
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      state, metrics = trainer.train_step(state, batch, None, learning_rate)
      common.block((state, metrics))
      times.append(time.perf_counter() - start)
    return state, times

  state, _ = pure_steps(state, 1)
  state, before = pure_steps(state, FLAGS.reps)

  with tempfile.TemporaryDirectory() as stage:
    start = time.perf_counter()
    fitted, _ = train.fit(model, variables, arrays, ds.spec, options, stage_dir=stage, seed=0,
                          mesh=mesh)
    fit_wall = time.perf_counter() - start
    records = checkpoint.read_metrics(stage)

  state, after = pure_steps(state, FLAGS.reps)
  eval_start = time.perf_counter()
  train.evaluate_variables(model, fitted, arrays, ds.spec, batch_size=FLAGS.batch_size,
                           precision=options.precision, mesh=mesh)
  eval_s = time.perf_counter() - eval_start

  pure = common.median(before + after)
  expected = FLAGS.steps_per_epoch * pure
  rows = []
  previous = 0.0
  for r in records:
    train_s = FLAGS.steps_per_epoch * FLAGS.batch_size / r['images_per_second']
    epoch_s = r['elapsed_s'] - previous
    previous = r['elapsed_s']
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
      'evaluate_s': eval_s, 'step_compile_s': compile_s, 'fit_wall_s': fit_wall,
  }
  print()
  print(f"{FLAGS.model}, batch {FLAGS.batch_size}, {FLAGS.steps_per_epoch} steps/epoch, "
        f"{FLAGS.test_size} test images, backend {jax.default_backend()}; pure step "
        f"{pure * 1e3:.0f} ms (median before/after the fit: "
        f"{summary['pure_step_ms_before_after'][0]:.0f} / "
        f"{summary['pure_step_ms_before_after'][1]:.0f} ms)")
  print(common.format_table(rows, ['epoch', 'train_phase_s', 'epoch_s', 'steps_x_pure_s',
                                   'train_ratio', 'epoch_ratio']))
  print()
  print(f"median over epochs 2..{FLAGS.epochs}: train phase {summary['train_ratio']:.3f}x, whole "
        f"epoch {summary['epoch_ratio']:.3f}x steps x pure step (target train phase <= 1.05x)")
  print(f"test-set evaluation, as at the end of every epoch: {eval_s:.2f} s")
  common.write_json(FLAGS.out, {'machine': common.machine(), 'summary': summary, 'rows': rows})


if __name__ == '__main__':
  common.run(main)
