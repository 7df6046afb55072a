r"""Training throughput of jaxprune's train step against an equivalent PyTorch step.

    python experiments/bench/throughput.py --out=/tmp/throughput.json

For each model (VGG-16 and ResNet-56, CIFAR, batch 128, float32 unless --precisions adds
bfloat16 for jax) it times
  * jax: `jaxprune.train.Trainer(model, make_optimizer(OptimizerConfig())).train_step`
    (SGD momentum 0.9, weight decay 1e-4, learning rate 0.1 as a step input; donated
    state, BN in train mode, loss + accuracy), once per `--jax_variants` entry
    'CONV_IMPL/XLA_OPTIONS/BATCH_NORM', the model's `PerformanceOptions` (conv_impl,
    xla_options, batch_norm): conv_impl 'native' is the plain `lax.conv_general_dilated`
    of nn.Conv, 'auto' jaxprune's rule; xla_options 'xla' is XLA's default compiler
    options, 'jaxprune' those of `jaxprune.kernels.compiler`; batch_norm 'flax' is
    nn.BatchNorm, 'jaxprune' `jaxprune.kernels.norm`'s (the default when the third part is
    left out). 'native/xla/flax' is the state before any fix, 'auto/jaxprune/jaxprune'
    the default;
  * torch: the same network (experiments/bench/torch_models.py) with torch.optim.SGD
    (momentum 0.9, weight decay 1e-4), cross-entropy, `torch.set_num_threads(--threads)`;
    on the GPU when PyTorch sees one (cudnn.benchmark on), else on the CPU.
Both train on one fixed random batch already in memory (no input pipeline), so only the
step is timed. Each measurement runs in its own process (one framework's idle thread pool
never competes with the other's), and the frameworks alternate for `--rounds` rounds so
that both see the same background load; the table gives the median over rounds of each
round's median step time. Compile time (jax: backend compile seconds from jax.monitoring;
the first call's wall time is reported too) is excluded from the step times.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['vgg16', 'resnet56'], 'Models (jaxprune registry names).')
flags.DEFINE_list('jax_variants', ['native/xla/flax', 'auto/xla/flax', 'auto/jaxprune/flax',
                                    'auto/jaxprune/jaxprune'],
                  "'CONV_IMPL/XLA_OPTIONS[/BATCH_NORM]' performance options to time jax with "
                  "('native/xla/flax' = before the fixes, 'auto/jaxprune/jaxprune' = the "
                  "default).")
flags.DEFINE_list('precisions', ['float32'], "jax's compute dtypes to time (train.PRECISIONS; "
                  "torch always float32).")
flags.DEFINE_list('frameworks', ['jax', 'torch'], 'Frameworks to time.')
flags.DEFINE_integer('batch', 128, 'Batch size.', lower_bound=1)
flags.DEFINE_integer('warmup', 2, 'Untimed steps after the first (compiling) one.', lower_bound=0)
flags.DEFINE_integer('steps', 6, 'Timed steps per measurement.', lower_bound=1)
flags.DEFINE_integer('native_steps', 2, "Timed steps (and no extra warmup) for conv_impl "
                     "'native' on VGG, whose 2x2 convolutions take tens of seconds per step.",
                     lower_bound=1)
flags.DEFINE_integer('rounds', 3, 'Alternating rounds (one process per framework and round).',
                     lower_bound=1)
flags.DEFINE_integer('threads', len(os.sched_getaffinity(0)),
                     'torch.set_num_threads; XLA uses one thread per available core.',
                     lower_bound=1)
flags.DEFINE_string('out', None, 'Write the table as JSON here.')
flags.DEFINE_string('worker', None, 'Internal: run one measurement (jax or torch).')
flags.DEFINE_string('model', None, 'Internal: the worker\'s model.')
flags.DEFINE_string('precision', 'float32', "Internal: the jax worker's compute dtype.")
flags.DEFINE_string('variant', 'auto/jaxprune/jaxprune',
                    "Internal: the jax worker's CONV_IMPL/XLA_OPTIONS/BATCH_NORM.")


def jax_worker(name: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxprune import models, train
  from jaxprune.kernels.options import PerformanceOptions

  conv_impl, xla_options, batch_norm = FLAGS.variant.split('/')
  performance = PerformanceOptions(conv_impl=conv_impl, batch_norm=batch_norm,
                                   xla_options=xla_options)
  with common.CompileLog() as compiles:
    model = models.build(name, performance=performance)
    key = jax.random.key(0)
    images = jax.random.normal(key, (FLAGS.batch, 32, 32, 3), jnp.float32)
    labels = jax.random.randint(jax.random.key(1), (FLAGS.batch,), 0, 10)
    variables = jax.jit(model.init)(key, images[:1])
    trainer = train.Trainer(model, train.make_optimizer(train.OptimizerConfig()),
                            precision=FLAGS.precision)
    learning_rate = np.float32(0.1)
    state = trainer.init_state(variables, seed=0)
    batch = trainer.shard_batch({'image': images, 'label': labels})
    jax.block_until_ready((state, batch))
    before = compiles.seconds()
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batch, None, learning_rate)
    jax.block_until_ready((state, metrics))
    first = time.perf_counter() - start
    compile_s = compiles.seconds() - before
  for _ in range(FLAGS.warmup):
    state, metrics = trainer.train_step(state, batch, None, learning_rate)
  jax.block_until_ready(state)
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batch, None, learning_rate)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return {'framework': 'jax', **model.performance.as_dict(),
          'precision': FLAGS.precision, 'compile_s': compile_s, 'first_step_s': first,
          'step_s': times, 'loss': float(metrics['loss'])}


def torch_worker(name: str) -> dict:
  import torch
  import torch_models
  torch.set_num_threads(FLAGS.threads)
  torch.manual_seed(0)
  # On a GPU box PyTorch trains on the GPU, as jax does; `.item()` below waits for it.
  device = common.torch_device()
  model = torch_models.build(name).to(device).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  images = torch.randn(FLAGS.batch, 3, 32, 32, device=device)
  labels = torch.randint(0, 10, (FLAGS.batch,), device=device)

  def step():
    opt.zero_grad(set_to_none=True)
    logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    opt.step()
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return loss.item(), accuracy.item()

  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  for _ in range(FLAGS.warmup):
    step()
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    loss, _ = step()
    times.append(time.perf_counter() - start)
  return {'framework': 'torch', 'conv_impl': '-', 'xla_options': '-', 'batch_norm': '-',
          'precision': 'float32', 'compile_s': 0.0, 'first_step_s': first, 'step_s': times,
          'loss': loss,
          'torch': torch.__version__, 'device': str(device),
          'torch_threads': torch.get_num_threads()}


def main(argv):
  del argv
  if FLAGS.worker:
    common.reply((jax_worker if FLAGS.worker == 'jax' else torch_worker)(FLAGS.model))
    return
  common.check_models(FLAGS.models, FLAGS.frameworks)

  from jaxprune.kernels import options
  variants = []  # (conv impl, XLA options, BatchNorm) of every --jax_variants entry
  for variant in FLAGS.jax_variants:
    parts = variant.split('/') + (['jaxprune'] if variant.count('/') == 1 else [])
    if (len(parts) != 3 or parts[0] not in options.CONV_IMPLS
        or parts[1] not in options.XLA_OPTION_SETS or parts[2] not in options.BATCH_NORMS):
      raise app.UsageError(f"--jax_variants entry {variant!r} is not "
                           f"CONV_IMPL/XLA_OPTIONS[/BATCH_NORM] with CONV_IMPL in "
                           f"{', '.join(options.CONV_IMPLS)}, XLA_OPTIONS in "
                           f"{', '.join(options.XLA_OPTION_SETS)} and BATCH_NORM in "
                           f"{', '.join(options.BATCH_NORMS)}.")
    variants.append(tuple(parts))
  from jaxprune import train
  for precision in FLAGS.precisions:
    if precision not in train.PRECISIONS:
      raise app.UsageError(f"--precisions entry {precision!r} is not one of "
                           f"{', '.join(train.PRECISIONS)}.")
  script = os.path.abspath(__file__)
  base = [f'--batch={FLAGS.batch}', f'--threads={FLAGS.threads}']
  steps = [f'--warmup={FLAGS.warmup}', f'--steps={FLAGS.steps}']
  slow = ['--warmup=0', f'--steps={min(FLAGS.steps, FLAGS.native_steps)}']
  runs = []
  for name in FLAGS.models:
    configs = []
    if 'jax' in FLAGS.frameworks:
      configs += [('jax', impl, xla, batch_norm, precision)
                  for impl, xla, batch_norm in variants for precision in FLAGS.precisions]
    if 'torch' in FLAGS.frameworks:
      configs.append(('torch', '-', '-', '-', 'float32'))
    for r in range(FLAGS.rounds):
      for framework, impl, xla, batch_norm, precision in configs:
        counts = slow if (impl == 'native' and name.startswith('vgg')) else steps
        res = common.run_worker(script, base + counts + [
            f'--worker={framework}', f'--model={name}', f'--precision={precision}',
            f'--variant={impl}/{xla}/{batch_norm}'])
        res.update(model=name, round=r, load_average=os.getloadavg()[0])
        runs.append(res)
        print(f"{name:9s} {framework:5s} {impl}/{xla}/{batch_norm} {precision} round {r}: "
              f"median step {common.median(res['step_s']) * 1e3:8.1f} ms, "
              f"compile {res['compile_s']:.1f} s, "
              f"load {res['load_average']:.1f}", flush=True)

  rows = []
  torch_version = next((r['torch'] for r in runs if r['framework'] == 'torch'), None)
  for name in FLAGS.models:
    torch_runs = [r for r in runs if r['model'] == name and r['framework'] == 'torch']
    torch_step = (common.median([common.median(r['step_s']) for r in torch_runs])
                  if torch_runs else None)
    groups = {}
    for r in runs:
      if r['model'] == name:
        key = (r['framework'], r['conv_impl'], r['xla_options'], r['batch_norm'], r['precision'])
        groups.setdefault(key, []).append(r)
    for (framework, impl, xla, batch_norm, precision), rs in groups.items():
      per_round = [common.median(r['step_s']) for r in rs]
      step = common.median(per_round)
      rows.append({
          'model': name, 'framework': framework, 'conv_impl': impl, 'xla_options': xla,
          'batch_norm': batch_norm, 'precision': precision, 'timed_steps': len(rs[0]['step_s']),
          'step_ms': step * 1e3,
          'step_ms_range': f"{min(per_round) * 1e3:.0f}-{max(per_round) * 1e3:.0f}",
          'images_per_s': FLAGS.batch / step,
          'vs_torch': (torch_step / step) if torch_step else None,
          'compile_s': common.median([r['compile_s'] for r in rs]),
          'first_step_s': common.median([r['first_step_s'] for r in rs]),
          'rounds': len(rs),
      })
  columns = ['model', 'framework', 'conv_impl', 'xla_options', 'batch_norm', 'precision',
             'timed_steps',
             'step_ms', 'step_ms_range', 'images_per_s', 'vs_torch', 'compile_s',
             'first_step_s', 'rounds']
  print()
  print(f"batch {FLAGS.batch}, torch float32 with threads {FLAGS.threads}, "
        f"{FLAGS.steps} timed steps after {FLAGS.warmup + 1} warmup ('native' VGG: "
        f"{min(FLAGS.steps, FLAGS.native_steps)} after 1), median over {FLAGS.rounds} rounds of "
        "each round's median; vs_torch = torch step time / this step time (target >= 0.9)")
  print(common.format_table(rows, columns))
  common.write_json(FLAGS.out, {'machine': common.machine(), 'torch': torch_version,
                                'threads': FLAGS.threads, 'batch': FLAGS.batch,
                                'rows': rows, 'runs': runs})


if __name__ == '__main__':
  common.run(main)
