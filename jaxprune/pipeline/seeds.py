"""`run`: a configuration's every stage, for one seed or `seeds` copies reported as mean ± std.

Copy i is the run of `replace(config, seed=config.seed + i)` in workdir/seed{seed} (and
baseline_dir/seed{seed}). `seed_batching` says how the copies train: 'loop' runs them one
after another through shared compiled steps, each exactly its separate run where the
backend's kernels are deterministic (the CPU; on a GPU XLA's are not by default); 'vmap'
trains the stages whose copies have equal widths as one vmapped program
(`stages.train_stage_copies`: equal to the separate runs up to float rounding).
"""

import contextlib
import dataclasses

import jax
from absl import logging

from jaxprune import stream
from jaxprune.errors import ConfigError
from jaxprune.pipeline import config as config_lib
from jaxprune.pipeline import regimes, results, stages, workdir


def seed_batching_for(name: str, backend: str, streamed: bool = False) -> str:
  """'loop' or 'vmap': what `name` (a SEED_BATCHING key) means on `backend`. 'auto' loops on
  CPUs and GPUs, where vmapping is no faster (experiments/bench/README.md) and the loop keeps
  each copy equal to its separate run, and vmaps on TPUs, whose matrix units want large
  batches. A streamed dataset feeds one run at a time: its copies loop."""
  config_lib.BY_NAME['seed_batching'].check(name)
  if streamed and name == 'vmap':
    raise ConfigError('seed_batching=vmap trains the copies from a dataset held on the '
                      'devices, but this one streams (input); use seed_batching=loop (or '
                      'auto), or input=device for a dataset that fits.',
                      settings=('seed_batching', 'input'))
  if name == 'auto':
    return 'vmap' if backend == 'tpu' and not streamed else 'loop'
  return name


def run(config) -> dict:
  """Runs (or resumes) every stage of `config` and returns the results (also in results.json)."""
  config_lib.validate(config)
  batching = seed_batching_for(config.seed_batching, jax.default_backend(),
                               stream.streams(config.dataset, config.input))
  # The copies differ only in seed and directories: one dataset (a max_train subset is the
  # same for every seed) serves them all.
  data = stages.load_data(config)
  copies = [config] if config.seeds == 1 else [dataclasses.replace(
      config, seed=seed, seeds=1, workdir=f'{config.workdir}/seed{seed}',
      baseline_dir=f'{config.baseline_dir}/seed{seed}' if config.baseline_dir else None)
      for seed in range(config.seed, config.seed + config.seeds)]
  # Everything the settings, the data and the directories must allow is checked before
  # anything is written, so a refused value leaves nothing behind.
  stages.check_feasible(config, data)
  for copy in copies:
    stages.check_directories(copy, data)
  with workdir.claimed(stages.absolute(config.workdir), wait=False,
                       what=f'workdir {config.workdir}', settings=('workdir',)):
    if config.seeds == 1:
      return stages.run_one(config, data)
    if batching == 'vmap':
      _train_copies_together(config, copies, data)
    per_seed = []
    for i, copy in enumerate(copies):
      logging.info('Seed %d (%d of %d)', copy.seed, i + 1, len(copies))
      per_seed.append(stages.run_one(copy, data))
    return results.write(config, {'rows': results.mean_rows(per_seed), 'per_seed': per_seed,
                                  'seed_batching': batching})


def _train_copies_together(config, copies: list, data: stages.Data) -> None:
  """Trains each stage of the copies, vmapped over every set of copies of equal widths,
  leaving their stage directories as `stages.run_one(copy)` would (it then only reads them).
  Baselines always share their widths; the prune stage runs per copy; a regime's copies train
  together where their plans have the same widths and length (a per-layer or preset
  selection gives every seed the same widths, a global one usually does not)."""
  seeds = [c.seed for c in copies]
  spec = stages.data_spec(config, data)
  with contextlib.ExitStack() as claims:
    for copy in sorted(copies, key=lambda c: str(stages.baseline_stage(c))):
      claims.enter_context(stages.baseline_claim(copy))
    starts = [stages.baseline_start(c, data) for c in copies]
    model = starts[0][0]
    logging.info('Stage baseline: seeds %s as one vmapped program', seeds)
    trained = stages.train_stage_copies(
        model, [init for _, init, _ in starts], data.arrays, spec,
        stages.train_options(config, config.epochs, stages.optimizer(config)),
        stage_dirs=[stage for _, _, stage in starts], seeds=seeds,
        checkpoint_dir=stages.absolute(config.baseline_dir or config.workdir) / 'vmapped/baseline',
        record=stages.stage_record(config))
  pruned = [stages.prune(copy, stages.Baseline(model, init, variables, result, stage), data).pruned
            for copy, (_, init, stage), (variables, result) in zip(copies, starts, trained)]
  build = stages.model_builder(config, data.dataset)
  for regime in config_lib.regimes_of(config):
    planned = [stages.regime_plan(c, regime, p, data) for c, p in zip(copies, pruned)]
    groups: dict[tuple, list[int]] = {}
    for i, (_, plan) in enumerate(planned):
      key = (tuple(sorted(plan.widths.items())), plan.epochs, plan.optimizer, plan.model,
             plan.batch_size)
      groups.setdefault(key, []).append(i)
    for members in groups.values():
      plan: regimes.Plan = planned[members[0]][1]
      logging.info('Stage %s: seeds %s as one vmapped program, %d epochs', regime,
                   [seeds[i] for i in members], plan.epochs)
      stages.train_stage_copies(
          plan.network(build), [planned[i][1].variables for i in members], data.arrays, spec,
          stages.train_options(config, plan.epochs, plan.optimizer, plan.batch_size),
          stage_dirs=[planned[i][0] for i in members], seeds=[seeds[i] for i in members],
          checkpoint_dir=stages.absolute(config.workdir) / 'vmapped' / regime,
          record=stages.regime_record(config, plan, pruned[members[0]], data))
