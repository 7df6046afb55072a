"""Helpers shared by the benchmark scripts: timing, compile counting, worker processes that
alternate, PyTorch's side of a comparison, one-sentence refusals, tables and JSON."""

import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags

THREADS = len(os.sched_getaffinity(0))
median = statistics.median
block = jax.block_until_ready


def machine() -> dict:
  """What the numbers were measured on."""
  import jaxlib
  cpu = platform.processor()
  with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
    cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
               cpu)
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__, 'backend': jax.default_backend(),
          'devices': len(jax.devices()), 'cpus_available': THREADS, 'cpu': cpu,
          'load_average': os.getloadavg()}


def timed(fn, *args):
  """(wall seconds, result) of one call of fn(*args), its result waited for."""
  start = time.perf_counter()
  result = block(fn(*args))
  return time.perf_counter() - start, result


def step_times(step, warmup: int, steps: int):
  """(first call's seconds, each of `steps` calls' seconds after `warmup` more, last result)."""
  first, result = timed(step)
  times = []
  for _ in range(warmup + steps):
    seconds, result = timed(step)
    times.append(seconds)
  return first, times[warmup:], result


def stepper(trainer, variables, batch: dict, learning_rate: float = 0.1):
  """step() -> (state, metrics): one train step on `batch`, on from the last (state donated)."""
  holder = {'state': trainer.init_state(variables, seed=0)}
  batch = trainer.shard_batch(batch)
  rate = np.float32(learning_rate)

  def step():
    holder['state'], metrics = trainer.train_step(holder['state'], batch, None, rate)
    return holder['state'], metrics

  return step


def random_batch(size: int, image_shape, seed: int = 0) -> dict:
  """A batch of normal random images and random labels of 10 classes (numpy)."""
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(size, *image_shape)).astype(np.float32),
          'label': rng.integers(0, 10, size).astype(np.int32)}


class CompileLog:
  """The XLA backend compilations (function name, seconds) while active, from jax.monitoring;
  a hit in jit's in-memory cache records nothing."""

  def _record(self, event, duration, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      self.events.append((kwargs.get('fun_name', '?'), float(duration)))

  def __enter__(self):
    self.events: list[tuple[str, float]] = []
    jax.monitoring.register_event_duration_secs_listener(self._record)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._record)

  def seconds(self) -> float:
    return sum(d for _, d in self.events)


def format_table(rows: list[dict], columns: list[str] | None = None, floats: str = '.3g') -> str:
  """A plain-text table of `rows` (dicts) in `columns` order (default: the first row's)."""
  columns = columns or list(rows[0])
  cells = [columns] + [[format(r[c], floats) if isinstance(r.get(c), float) else
                        str(r.get(c, '')) for c in columns] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  lines = ['  '.join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def write_json(path: str | None, **payload) -> None:
  """Writes `payload` and the machine it was measured on to `path` (nothing without one)."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'machine': machine(), **payload}, f, indent=2, default=str)
  print(f'wrote {path}')


def run_worker(args: list[str]) -> dict:
  """The last JSON line of this script rerun with its flags and then `args`, in a process of its
  own so that no idle thread pool competes; its `error: ...` sentence is passed on."""
  proc = subprocess.run([sys.executable, os.path.abspath(sys.argv[0])] + sys.argv[1:] + args,
                        capture_output=True, text=True, timeout=3600)
  if proc.returncode != 0:
    last_line = (proc.stderr.strip().splitlines() or [''])[-1]
    if last_line.startswith('error: '):
      sys.exit(last_line)
    raise RuntimeError(f'worker {args} failed:\n{proc.stderr[-4000:]}')
  return json.loads([line for line in proc.stdout.splitlines() if line.startswith('{')][-1])


def validate_entries(name: str, parse, allowed, message: str) -> None:
  """absl's check that every entry of list flag `name` parses and is `allowed`, else `message`."""
  def valid(values) -> bool:
    try:
      return all(allowed(parse(v)) for v in values)
    except ValueError:
      return False

  flags.register_validator(name, valid, message)


def define_comparison_flags(rounds: int) -> None:
  """The flags of a jax-against-PyTorch comparison (throughput.py, epoch_throughput.py)."""
  flags.DEFINE_list('models', ['vgg16', 'resnet56'], 'Models (jaxprune registry names).')
  flags.DEFINE_list('frameworks', ['jax', 'torch'], 'Frameworks to time.')
  flags.DEFINE_integer('batch', 128, 'Batch size.', lower_bound=1)
  flags.DEFINE_integer('rounds', rounds, 'Alternating rounds (one process per configuration '
                       'and round).', lower_bound=1)
  flags.DEFINE_integer('threads', THREADS, 'torch.set_num_threads; XLA uses one thread per '
                       'available core.', lower_bound=1)
  flags.DEFINE_string('out', None, 'Write the table as JSON here.')
  flags.DEFINE_string('worker', None, 'Internal: run one measurement (jax or torch).')
  flags.DEFINE_string('model', None, "Internal: the worker's model.")


def compare(configs: dict[str, list[str]], rate, extra):
  """(runs, rows): each --models entry under each configuration ({label: worker flags}) in a
  worker process, alternating for --rounds rounds so that all see the same load; per row the
  median and range of rate(run) (images/s), vs_torch (over the fastest torch's), extra(runs)."""
  FLAGS = flags.FLAGS
  runs, rows = [], []
  for name in FLAGS.models:
    for r in range(FLAGS.rounds):
      for label, args in configs.items():
        result = run_worker(args + [f'--model={name}'])
        result.update(model=name, config=label, round=r, load_average=os.getloadavg()[0])
        runs.append(result)
        print(f"{name:9s} {label:34s} round {r}: {rate(result):8.1f} images/s, load "
              f"{result['load_average']:.1f}", flush=True)
    model_rows = []
    for label in configs:
      rs = [r for r in runs if r['model'] == name and r['config'] == label]
      per_round = [rate(r) for r in rs]
      model_rows.append({'model': name, 'config': label, 'images_per_s': median(per_round),
                         'range': f'{min(per_round):.1f}-{max(per_round):.1f}', **extra(rs)})
    fastest = max((r['images_per_s'] for r in model_rows if r['config'].startswith('torch')),
                  default=None)
    rows += [{**row, 'vs_torch': row['images_per_s'] / fastest if fastest else None}
             for row in model_rows]
  return runs, rows


def torch_training(name: str, threads: int):
  """(device, step): step(images, labels) -> (logits, loss) trains `name`'s twin in torch_models
  once with SGD (lr 0.1, momentum 0.9, weight decay 1e-4) on the GPU when PyTorch sees one (cudnn
  autotuning on, as reference training scripts set it), else on `threads` CPU threads."""
  import torch
  import torch_models
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.backends.cudnn.benchmark = device.type == 'cuda'
  model = torch_models.build(name).to(device).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

  def step(images, labels):
    optimizer.zero_grad(set_to_none=True)
    logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    optimizer.step()
    return logits, loss

  return device, step


def require_torch(asked: str, instead: str) -> None:
  """absl's one-sentence UsageError when PyTorch (a bench-only extra) is missing."""
  if importlib.util.find_spec('torch') is None:
    raise app.UsageError(f"{asked}, but PyTorch is not installed: pip install "
                         f"'jaxprune[bench]', or {instead}.")


def require_data_path(path: str | None) -> None:
  """absl's UsageError when --data_path is missing: the sample has no default place."""
  if not path:
    raise app.UsageError('--data_path is required: the .npz of the CIFAR-10 sample (uint8 '
                         'NHWC train_images, train_labels, test_images, test_labels).')


def check_models(models: list[str], frameworks: list[str]) -> None:
  """absl's UsageError naming --frameworks entries other than jax or torch, or --models entries
  not registered (or, with torch, without a twin in torch_models)."""
  from jaxprune import models as registry
  unknown = sorted(set(frameworks) - {'jax', 'torch'})
  if unknown:
    raise app.UsageError(f'--frameworks {unknown} are not jax or torch.')
  allowed = set(registry.MODELS)
  if 'torch' in frameworks:
    require_torch('--frameworks includes torch', 'pass --frameworks=jax')
    import torch_models
    allowed &= set(torch_models.MODELS)
  unknown = [m for m in models if m not in allowed]
  if unknown:
    raise app.UsageError(f"--models {unknown} cannot be timed with --frameworks "
                         f"{','.join(frameworks)}; choose from {', '.join(sorted(allowed))}.")


def run(main, worker=None) -> None:
  """absl's app.run of main(), jaxprune's ConfigError shown as its one sentence; given --worker,
  worker(its value) instead, printed as the JSON line `run_worker` reads."""
  from jaxprune.errors import exit_on_user_error

  def guarded(argv):
    del argv
    with exit_on_user_error():
      if not (worker and flags.FLAGS.worker):
        return main()
      print(json.dumps(worker(flags.FLAGS.worker)), flush=True)

  app.run(guarded)
