r"""The measured basis of jaxprune.kernels.conv's rule: each formulation per conv shape.

    python experiments/bench/conv_rule.py --out=conv_rule.json

For every distinct convolution of VGG-16 and ResNet-56 on 32x32 CIFAR images (batch 128,
float32) it times, on the current backend, the three passes a training step runs:
  fwd  y = conv(x, k)
  dx   the input gradient  (vjp of y w.r.t. x)
  dk   the kernel gradient (vjp of y w.r.t. k)
for each formulation in `jaxprune.kernels.conv.FORMULATIONS` ('native' =
lax.conv_general_dilated, 'patches' = im2col + matmul, ...). The formulations are timed
round-robin (one call of each per repetition), so a burst of background load hits all of
them alike; the table shows medians and GFLOP/s (2 * MACs / s) and marks the fastest.
Everything is compiled with `jaxprune.kernels.compiler`'s options, as the library compiles its
steps (`--xla_options=xla` times XLA's defaults instead). With `--torch`, PyTorch's
conv2d passes (NCHW, `torch.nn.grad` for the gradients) are timed in a separate process
the same way and shown as a reference column (`pip install torch`).
"""

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch', 128, 'Batch size.', lower_bound=1)
flags.DEFINE_integer('reps', 5, 'Timed repetitions per pass and formulation.', lower_bound=1)
flags.DEFINE_list('formulations', None, 'Formulations to time (default: all).')
PASSES = ('fwd', 'dx', 'dk')
flags.DEFINE_list('passes', list(PASSES), f"Passes to time: {', '.join(PASSES)}.")
flags.DEFINE_string('shapes', None, "Only these 'size:cin:cout:kernel:stride' entries, "
                    "semicolon-separated (default: VGG-16's and ResNet-56's).")
flags.DEFINE_bool('torch', False, "Also time PyTorch's conv2d passes (NCHW, its own process, "
                  '--threads threads) as a reference column.')
flags.DEFINE_integer('threads', len(os.sched_getaffinity(0)), 'torch.set_num_threads.',
                     lower_bound=1)
flags.DEFINE_string('xla_options', 'jaxprune', "The XLA option set to compile with "
                    "(jaxprune.kernels.options.XLA_OPTION_SETS; 'xla': XLA's defaults).")
flags.DEFINE_string('out', None, 'Write the table as JSON here.')
flags.DEFINE_bool('worker', False, 'Internal: time the PyTorch passes and print them as JSON.')

# (input size, C_in, C_out, kernel, stride) -> the models using it.
SHAPES = {
    (32, 3, 64, 3, 1): 'vgg16', (32, 64, 64, 3, 1): 'vgg16', (16, 64, 128, 3, 1): 'vgg16',
    (16, 128, 128, 3, 1): 'vgg16', (8, 128, 256, 3, 1): 'vgg16', (8, 256, 256, 3, 1): 'vgg16',
    (4, 256, 512, 3, 1): 'vgg16', (4, 512, 512, 3, 1): 'vgg16', (2, 512, 512, 3, 1): 'vgg16',
    (32, 3, 16, 3, 1): 'resnet56', (32, 16, 16, 3, 1): 'resnet56',
    (32, 16, 32, 3, 2): 'resnet56', (16, 32, 32, 3, 1): 'resnet56',
    (16, 32, 64, 3, 2): 'resnet56', (8, 64, 64, 3, 1): 'resnet56',
}


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
  shapes = []
  for entry in text.split(';'):
    parts = entry.split(':')
    if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise app.UsageError(f"--shapes entry {entry!r} is not 'size:cin:cout:kernel:stride' "
                           'with five positive integers, e.g. 32:16:16:3:1.')
    shapes.append(tuple(int(p) for p in parts))
  return shapes


def _selected_shapes() -> dict:
  if FLAGS.shapes:
    return {shape: '-' for shape in _parse_shapes(FLAGS.shapes)}
  return SHAPES


def _shape_key(size, cin, cout, k, s) -> str:
  # The worker's JSON keys: one string per shape, as --shapes spells it.
  return f'{size}:{cin}:{cout}:{k}:{s}'


def torch_worker(shapes: dict) -> dict:
  """Median milliseconds of each pass of torch's conv2d per shape, timed like the jax ones."""
  import torch
  torch.set_num_threads(FLAGS.threads)
  torch.manual_seed(0)
  out = {}
  for (size, cin, cout, k, s) in shapes:
    x = torch.randn(FLAGS.batch, cin, size, size)
    w = torch.randn(cout, cin, k, k) / (k * cin ** 0.5)
    conv = lambda: torch.nn.functional.conv2d(x, w, stride=s, padding=k // 2)
    g = torch.randn_like(conv())
    passes = {
        'fwd': conv,
        'dx': lambda: torch.nn.grad.conv2d_input(x.shape, w, g, stride=s, padding=k // 2),
        'dk': lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, stride=s, padding=k // 2),
    }
    for fn in list(passes.values()) * 2:
      fn()  # warm up (allocator, oneDNN primitive caches)
    times = {p: [] for p in FLAGS.passes}
    for _ in range(FLAGS.reps):
      for p in times:
        start = time.perf_counter()
        passes[p]()
        times[p].append(time.perf_counter() - start)
    out[_shape_key(size, cin, cout, k, s)] = {p: common.median(t) * 1e3 for p, t in times.items()}
  return out


def main(argv):
  del argv
  # Bad settings stop here, in one sentence, before anything is timed.
  unknown = [p for p in FLAGS.passes if p not in PASSES]
  if unknown:
    raise app.UsageError(f"--passes {unknown} are not among {', '.join(PASSES)}.")
  shapes = _selected_shapes()
  if FLAGS.torch:
    common.require_torch('--torch asks for PyTorch', 'leave --torch out')
  if FLAGS.worker:
    common.reply(torch_worker(shapes))
    return
  from jaxprune.kernels import conv, options
  if FLAGS.xla_options not in options.XLA_OPTION_SETS:
    raise app.UsageError(f"--xla_options={FLAGS.xla_options} is not one of "
                         f"{', '.join(options.XLA_OPTION_SETS)}.")
  names = FLAGS.formulations or list(conv.FORMULATIONS)
  unknown = [name for name in names if name not in conv.FORMULATIONS]
  if unknown:
    raise app.UsageError(f"--formulations {unknown} are not among "
                         f"{', '.join(conv.FORMULATIONS)}.")
  torch_ms = {}
  if FLAGS.torch:
    torch_ms = common.run_worker(os.path.abspath(__file__), [
        f'--batch={FLAGS.batch}', f'--reps={FLAGS.reps}', f'--threads={FLAGS.threads}',
        f"--passes={','.join(FLAGS.passes)}", '--worker'] + (
        [f'--shapes={FLAGS.shapes}'] if FLAGS.shapes else []))
  import jax

  from jaxprune.kernels import compiler

  jit = functools.partial(compiler.jit, xla_options=FLAGS.xla_options)
  rows = []
  for (size, cin, cout, k, s), used_by in shapes.items():
    x = jax.random.normal(jax.random.key(0), (FLAGS.batch, size, size, cin))
    kernel = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) / (k * cin ** 0.5)
    pads = tuple(jax.lax.padtype_to_pads((size, size), (k, k), (s, s), 'SAME'))
    fns, y = {}, None
    for name in names:
      f = conv.FORMULATIONS[name]
      apply = lambda x, w, f=f: f(x, w, (s, s), pads)
      y = apply(x, kernel)
      fns[(name, 'fwd')] = jit(apply)
      fns[(name, 'dx')] = jit(
          lambda x, w, g, apply=apply: jax.vjp(lambda x: apply(x, w), x)[1](g))
      fns[(name, 'dk')] = jit(
          lambda x, w, g, apply=apply: jax.vjp(lambda w: apply(x, w), w)[1](g))
    g = jax.random.normal(jax.random.key(2), y.shape)
    macs = y.size * k * k * cin
    args = {'fwd': (x, kernel), 'dx': (x, kernel, g), 'dk': (x, kernel, g)}
    for key, fn in fns.items():
      common.block(fn(*args[key[1]]))  # compile
    times = {key: [] for key in fns if key[1] in FLAGS.passes}
    for _ in range(FLAGS.reps):
      for key in times:
        start = time.perf_counter()
        common.block(fns[key](*args[key[1]]))
        times[key].append(time.perf_counter() - start)
    for p in FLAGS.passes:
      med = {name: common.median(times[(name, p)]) for name in names}
      best = min(med, key=med.get)
      row = {'shape': f'{size}x{size} {cin}->{cout} k{k} s{s}', 'used_by': used_by, 'pass': p,
             'out': f'{y.shape[1]}x{y.shape[2]}', 'best': best}
      for name in names:
        row[f'{name}_ms'] = med[name] * 1e3
        row[f'{name}_gflops'] = 2 * macs / med[name] / 1e9
      if torch_ms:
        row['torch_ms'] = torch_ms[_shape_key(size, cin, cout, k, s)][p]
      rows.append(row)
      print(common.format_table([row], list(row)).splitlines()[-1], flush=True)
  columns = ['shape', 'used_by', 'out', 'pass'] + [f'{n}_ms' for n in names] + [
      f'{n}_gflops' for n in names] + ['best'] + (['torch_ms'] if torch_ms else [])
  print()
  print(f'batch {FLAGS.batch}, float32, backend {jax.default_backend()}, median of '
        f'{FLAGS.reps} round-robin repetitions')
  print(common.format_table(rows, columns))
  common.write_json(FLAGS.out, {'machine': common.machine(), 'batch': FLAGS.batch, 'rows': rows})


if __name__ == '__main__':
  common.run(main)
