r"""Training throughput: jaxprune's train step (per --jax_variants and --precisions entry)
against its PyTorch twin's (torch_models.py), one process per measurement, the configurations
alternating (bench README, section 2).
"""

from absl import app, flags

import common

FLAGS = flags.FLAGS
common.define_comparison_flags(rounds=3)
flags.DEFINE_list('jax_variants', ['native/xla/flax', 'auto/xla/flax', 'auto/jaxprune/flax',
                                   'auto/jaxprune/jaxprune'],
                  "'CONV_IMPL/XLA_OPTIONS[/BATCH_NORM]' performance options to time jax with.")
flags.DEFINE_list('precisions', ['float32'], "jax's compute dtypes (train.PRECISIONS).")
flags.DEFINE_integer('warmup', 2, 'Untimed steps after the first (compiling) one.', lower_bound=0)
flags.DEFINE_integer('steps', 6, 'Timed steps per measurement.', lower_bound=1)
flags.DEFINE_string('precision', 'float32', "Internal: the jax worker's compute dtype.")
flags.DEFINE_string('variant', 'auto/jaxprune/jaxprune', "Internal: the jax worker's variant.")


def jax_worker(name: str) -> dict:
  import jax

  from jaxprune import models, train
  from jaxprune.kernels.options import PerformanceOptions

  conv_impl, xla_options, batch_norm = FLAGS.variant.split('/')
  model = models.build(name, performance=PerformanceOptions(
      conv_impl=conv_impl, xla_options=xla_options, batch_norm=batch_norm))
  trainer = train.Trainer(model, train.make_optimizer(train.OptimizerConfig()),
                          precision=FLAGS.precision)
  step = common.stepper(trainer, models.init(model, jax.random.key(0), (32, 32, 3)),
                        common.random_batch(FLAGS.batch, (32, 32, 3)))
  # Native VGG's 2x2 convolutions take tens of seconds per step: 2 timed steps, no warmup.
  slow = conv_impl == 'native' and name.startswith('vgg')
  with common.CompileLog() as compiles:
    first, times, (_, metrics) = common.step_times(
        step, 0 if slow else FLAGS.warmup, min(FLAGS.steps, 2) if slow else FLAGS.steps)
  return {'framework': 'jax', **model.performance.as_dict(), 'precision': FLAGS.precision,
          'compile_s': compiles.seconds(), 'first_step_s': first, 'step_s': times,
          'loss': float(metrics['loss'])}


def torch_worker(name: str) -> dict:
  import torch
  device, train_step = common.torch_training(name, FLAGS.threads)
  images = torch.randn(FLAGS.batch, 3, 32, 32, device=device)
  labels = torch.randint(0, 10, (FLAGS.batch,), device=device)

  def step():
    logits, loss = train_step(images, labels)
    # `.item()` waits for the device.
    return loss.item(), (logits.argmax(-1) == labels).float().mean().item()

  first, times, (loss, _) = common.step_times(step, FLAGS.warmup, FLAGS.steps)
  return {'framework': 'torch', 'precision': 'float32', 'compile_s': 0.0,
          'first_step_s': first, 'step_s': times, 'loss': loss, 'torch': torch.__version__,
          'device': str(device), 'torch_threads': torch.get_num_threads()}


def variant(entry: str) -> str:
  """'CONV_IMPL/XLA_OPTIONS/BATCH_NORM' of a --jax_variants entry, or a UsageError."""
  from jaxprune.kernels import options
  parts = entry.split('/') + (['jaxprune'] if entry.count('/') == 1 else [])
  if (len(parts) != 3 or parts[0] not in options.CONV_IMPLS
      or parts[1] not in options.XLA_OPTION_SETS or parts[2] not in options.BATCH_NORMS):
    raise app.UsageError(
        f"--jax_variants entry {entry!r} is not CONV_IMPL/XLA_OPTIONS[/BATCH_NORM] with CONV_IMPL "
        f"in {', '.join(options.CONV_IMPLS)}, XLA_OPTIONS in {', '.join(options.XLA_OPTION_SETS)}"
        f" and BATCH_NORM in {', '.join(options.BATCH_NORMS)}.")
  return '/'.join(parts)


def main():
  common.check_models(FLAGS.models, FLAGS.frameworks)
  from jaxprune import train
  unknown = sorted(set(FLAGS.precisions) - set(train.PRECISIONS))
  if unknown:
    raise app.UsageError(f"--precisions {unknown} are not among {', '.join(train.PRECISIONS)}.")
  configs = {}
  if 'jax' in FLAGS.frameworks:
    configs = {f'jax {v} {p}': ['--worker=jax', f'--variant={v}', f'--precision={p}']
               for v in map(variant, FLAGS.jax_variants) for p in FLAGS.precisions}
  if 'torch' in FLAGS.frameworks:
    configs['torch float32'] = ['--worker=torch']
  runs, rows = common.compare(
      configs, lambda r: FLAGS.batch / common.median(r['step_s']),
      lambda rs: {'timed_steps': len(rs[0]['step_s']),
                  'compile_s': common.median([r['compile_s'] for r in rs]),
                  'first_step_s': common.median([r['first_step_s'] for r in rs])})
  for row in rows:
    row['step_ms'] = 1e3 * FLAGS.batch / row['images_per_s']
  print(f"\nbatch {FLAGS.batch}, torch threads {FLAGS.threads}; median over rounds of each "
        "round's median step; vs_torch = this images/s / torch's (CPU target >= 0.9)")
  print(common.format_table(rows, ['model', 'config', 'step_ms', 'images_per_s', 'range',
                                   'vs_torch', 'compile_s', 'first_step_s', 'timed_steps']))
  common.write_json(FLAGS.out, threads=FLAGS.threads, batch=FLAGS.batch, rows=rows, runs=runs)


if __name__ == '__main__':
  common.run(main, lambda kind: (jax_worker if kind == 'jax' else torch_worker)(FLAGS.model))
