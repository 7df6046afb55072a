"""Inference latency of an experiment's trained architectures on this machine.

Does a MACs saving become speed? For every finished run whose network differs, the eval-mode
forward pass (jaxprune's compiler options, float32) is timed at batch 1 and batch 128,
round-robin over the architectures (one call of each per repetition, so they see the same
background load), compile time excluded; the medians go to ROOT/EXPERIMENT/latency.json,
keyed by the run's name, with the MACs and params of the network timed and the machine.
The unpruned network the runs were pruned from is timed in the same round-robin, under
`unpruned` keyed by `unpruned_name`, so a saving in MACs can be read against its speed.
`experiments.report` shows them beside each architecture's MACs.
"""

import functools
import json
import os
import platform
import time
from typing import Sequence

BATCHES = (1, 128)
REPETITIONS = 15


def unpruned_name(model: str, width_multiplier: float, dataset: str) -> str:
  """The key of an unpruned network's timings in latency.json."""
  return f'{model} x{width_multiplier:g} {dataset}'


def _row(snapshot: dict, stage: str) -> dict:
  return next(r for r in snapshot['rows'] if r['stage'] == stage)


def _widths(snapshot: dict, regime: str):
  row = _row(snapshot, regime)
  widths = row.get('widths')
  if widths is None and regime in ('scratch', 'scratch_b', 'finetune'):
    widths = snapshot['prune']['widths']   # these regimes train the pruned widths
  return widths, row


def _network(config, widths):
  from jaxprune import models
  from jaxprune.pipeline import config as config_lib
  num_classes, image_shape = _dataset_shape(config.dataset, config.data_path, config.data_dir,
                                            config.max_train)
  return models.build(config.model, num_classes, widths,
                      performance=config_lib.performance_options(config),
                      width_multiplier=config.width_multiplier,
                      bn_scale_init=config.bn_scale_init, dense_init=config.dense_init,
                      resnet_shortcut=config.resnet_shortcut, image_shape=image_shape), image_shape


@functools.lru_cache(maxsize=4)
def _dataset_shape(name, data_path, data_dir, max_train):
  from jaxprune import data
  dataset = data.load(name, data_path=data_path, data_dir=data_dir, max_train=max_train)
  return dataset.num_classes, dataset.image_shape


def _timer(model, image_shape, batch: int):
  import jax
  import jax.numpy as jnp
  from jaxprune import models
  from jaxprune.kernels import compiler
  variables = models.init(model, jax.random.key(0), image_shape)
  x = jnp.zeros((batch, *image_shape), jnp.float32)
  forward = compiler.jit(functools.partial(model.apply, train=False))
  forward(variables, x).block_until_ready()

  def once() -> float:
    start = time.perf_counter()
    forward(variables, x).block_until_ready()
    return time.perf_counter() - start
  return once


def measure(root: str, experiment: str, runs: Sequence, log=print) -> dict:
  """Times every finished run's network (module docstring); returns what it wrote."""
  import numpy as np
  from etils import epath
  from jaxprune.prune import flops, program
  nets = {}      # (model, multiplier, dataset, widths) -> (config, entries timed as it)
  table, unpruned = {}, {}
  for run in runs:
    snapshot = epath.Path(run.snapshot)
    if not snapshot.exists():
      continue
    results = json.loads(snapshot.read_text())
    widths, row = _widths(results, run.config.regime)
    if widths is None:
      continue
    c = run.config
    table[run.name] = {'macs': row['macs'], 'params': row['params']}
    key = (c.model, c.width_multiplier, c.dataset, json.dumps(widths, sort_keys=True))
    nets.setdefault(key, (c, []))[1].append(table[run.name])
    name = unpruned_name(c.model, c.width_multiplier, c.dataset)
    if name not in unpruned:
      baseline = _row(results, 'baseline')
      unpruned[name] = {'macs': baseline['macs'], 'params': baseline['params']}
      nets[key[:3] + ('null',)] = (c, [unpruned[name]])   # widths None: the defaults
  if not table:
    log('latency: no finished architecture to time.')
    return {}
  timers = {}
  for key, (config, entries) in nets.items():
    model, image_shape = _network(config, json.loads(key[3]))
    cost = flops.count(program.derive(model, image_shape).structure)
    for batch in BATCHES:
      timers[(key, batch)] = _timer(model, image_shape, batch)
    for entry in entries:
      entry['timed_macs'] = cost.macs
  log(f'latency: {len(nets) - len(unpruned)} architectures and {len(unpruned)} unpruned '
      f'network(s) x batches {BATCHES}, {REPETITIONS} round-robin repetitions')
  samples = {k: [] for k in timers}
  for _ in range(REPETITIONS):
    for k, once in timers.items():
      samples[k].append(once())
  for (key, batch), times in samples.items():
    for entry in nets[key][1]:
      entry[f'ms_batch{batch}'] = 1e3 * float(np.median(times))
  import jax
  out = {'machine': {'processor': platform.processor() or platform.machine(),
                     'cpus': os.cpu_count(), 'device': jax.devices()[0].device_kind},
         'repetitions': REPETITIONS, 'batches': list(BATCHES), 'runs': table,
         'unpruned': unpruned}
  path = epath.Path(root) / experiment / 'latency.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1, sort_keys=True))
  log(f'latency: wrote {path}')
  return out
