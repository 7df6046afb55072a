"""Helpers shared by the benchmark scripts: timing, compile counting, machine info, tables."""

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


def machine() -> dict:
  """What the numbers were measured on."""
  info = {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jax.lib.__version__ if hasattr(jax.lib, '__version__') else None,
          'backend': jax.default_backend(), 'devices': len(jax.devices()),
          'cpus_available': len(os.sched_getaffinity(0)), 'cpu': platform.processor()}
  try:
    import jaxlib
    info['jaxlib'] = jaxlib.__version__
  except ImportError:
    pass
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          info['cpu'] = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  try:
    info['load_average'] = os.getloadavg()
  except OSError:
    pass
  return info


def block(tree):
  return jax.block_until_ready(tree)


def median(values):
  return statistics.median(values)


class CompileLog:
  """Counts XLA compilations (and their seconds) through `jax.monitoring` while active.

  Every backend compilation JAX performs records '/jax/core/compile/backend_compile_duration'
  with the function's name; a cache hit in jit's in-memory cache records nothing.
  """
  EVENT = '/jax/core/compile/backend_compile_duration'
  _active: list = []
  _registered = False

  def __init__(self):
    self.events: list[tuple[str, float]] = []

  @classmethod
  def _listener(cls, event, duration, **kwargs):
    if event == cls.EVENT:
      for log in cls._active:
        log.events.append((kwargs.get('fun_name', '?'), float(duration)))

  def __enter__(self):
    if not CompileLog._registered:
      jax.monitoring.register_event_duration_secs_listener(CompileLog._listener)
      CompileLog._registered = True
    CompileLog._active.append(self)
    return self

  def __exit__(self, *exc):
    CompileLog._active.remove(self)

  def count(self, name_contains: str | None = None) -> int:
    return sum(1 for n, _ in self.events if name_contains is None or name_contains in n)

  def seconds(self, name_contains: str | None = None) -> float:
    return sum(d for n, d in self.events if name_contains is None or name_contains in n)

  def by_name(self) -> dict:
    out = {}
    for n, d in self.events:
      c, s = out.get(n, (0, 0.0))
      out[n] = (c + 1, s + d)
    return out


def format_table(rows: list[dict], columns: list[str], floats: str = '.3g') -> str:
  """A plain-text table of `rows` (dicts) in the given column order."""
  def cell(v):
    if isinstance(v, float):
      return format(v, floats)
    return str(v)
  cells = [[c for c in columns]] + [[cell(r.get(c, '')) for c in columns] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  lines = ['  '.join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def torch_device():
  """PyTorch's device for a reference run: the GPU when it sees one (cudnn autotuning on,
  as reference training scripts set it), else the CPU. Imports torch (bench-only)."""
  import torch
  if torch.cuda.is_available():
    torch.backends.cudnn.benchmark = True
    return torch.device('cuda')
  return torch.device('cpu')


def write_json(path: str | None, payload: dict) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(payload, f, indent=2, sort_keys=False, default=str)
  print(f'wrote {path}')


def check_child(proc: subprocess.CompletedProcess, name: str) -> None:
  """Returns if `proc` succeeded. A child that ended with one `error: ...` sentence (a bad
  setting, as `run` and launch.py report it) passes that sentence on and exits; any other
  failure raises with the end of the child's stderr."""
  if proc.returncode == 0:
    return
  last_line = (proc.stderr.strip().splitlines() or [''])[-1]
  if last_line.startswith('error: '):
    sys.exit(last_line)
  raise RuntimeError(f'{name} failed:\n{proc.stderr[-4000:]}')


def run_worker(script: str, args: list[str], env: dict | None = None,
               timeout: float = 3600) -> dict:
  """Runs `python script args` in a fresh process and returns the JSON it prints last.

  Each measurement gets its own process, so one framework's thread pools (XLA's Eigen
  pool, torch's OpenMP threads) never spin while the other one is being timed.
  """
  full_env = dict(os.environ)
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, script] + args, env=full_env, capture_output=True,
                        text=True, timeout=timeout)
  check_child(proc, f'worker {args}')
  last = [line for line in proc.stdout.splitlines() if line.startswith('{')][-1]
  return json.loads(last)


def require_torch(asked: str, instead: str) -> None:
  """absl's UsageError, in one sentence, when PyTorch (a bench-only extra) is missing."""
  from absl import app
  if importlib.util.find_spec('torch') is None:
    raise app.UsageError(f"{asked}, but PyTorch is not installed: pip install "
                         f"'jaxprune[bench]', or {instead}.")


def require_data_path(path: str | None) -> None:
  """absl's UsageError, in one sentence, when --data_path is missing: the sample has no
  default place on a machine, so the scripts that read it ask for it."""
  from absl import app
  if not path:
    raise app.UsageError('--data_path is required: the .npz of the CIFAR-10 sample (uint8 '
                         'NHWC train_images, train_labels, test_images, test_labels).')


def check_models(models: list[str], frameworks: list[str]) -> None:
  """absl's UsageError naming a --frameworks entry other than jax or torch, or the --models
  entries that cannot be timed in `frameworks`.

  jax times any registered jaxprune model; torch only those with a twin in torch_models.
  """
  from absl import app

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


def reply(result: dict) -> None:
  """A worker's side of `run_worker`: prints `result` as the JSON line its parent reads."""
  print(json.dumps(result), flush=True)


def timed(fn, *args, repeats: int) -> list[float]:
  """Seconds of `repeats` calls of fn(*args), each waited for."""
  out = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn(*args))
    out.append(time.perf_counter() - start)
  return out


@contextlib.contextmanager
def stopwatch(into: dict, key: str):
  start = time.perf_counter()
  yield
  into[key] = time.perf_counter() - start


def run(main) -> None:
  """`app.run(main)`, with a bad setting that jaxprune rejects (an unknown model, criterion
  or regime, a MACs target outside (0, 1], ...) printed as its one-sentence ConfigError
  instead of a traceback."""
  from absl import app

  from jaxprune.errors import exit_on_user_error

  def guarded(argv):
    with exit_on_user_error():
      return main(argv)

  app.run(guarded)
