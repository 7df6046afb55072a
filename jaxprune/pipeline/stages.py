"""The main job as resumable stages of a work directory: baseline -> prune -> regimes -> results.

    workdir/
      baseline/     (or --baseline_dir, shared by many runs) init/, checkpoints, result.json
      prune/        record.json: criterion, selection, masks, widths, kept indices, scores,
                    MACs/params before and after, accuracy right after pruning; variables/;
                    iterative: finetune/ with pruning_curve.jsonl (per epoch: test accuracy,
                    channels removed, MACs of the masked network)
      <regime>/     checkpoints, metrics.jsonl, result.json (one per regime run)
      results.json  the summary table's content, the configuration, versions and devices

Every stage writes `stage_config.json` with the settings it depends on; a stage
directory made with other settings is refused, and a finished stage is skipped.
"""

import dataclasses
import json
import math
import platform
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from jaxprune import data, models, train
from jaxprune.kernels import compiler
from jaxprune.pipeline import regimes
from jaxprune.prune import criteria, flops, select, shrink
from jaxprune.train import checkpoint
from jaxprune.prune import structure as structure_lib
from jaxprune.errors import ConfigError, choose
from jaxprune.kernels import conv

SCHEDULES = ('oneshot', 'iterative')
REGIME_CHOICES = regimes.REGIMES + ('all',)


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on; `launch.py` fills it from flags."""
  workdir: str
  model: str = 'tiny'
  dataset: str = 'digits'
  data_path: str | None = None
  data_dir: str | None = None
  max_train: int | None = None
  criterion: str = 'taylor'
  selection: str = 'global_l2'
  prune_ratio: float | None = None
  target_macs: float | None = None
  preset: str | None = None
  min_channels: int = 1
  round_to: int = 1
  flops_penalty: float = 0.0
  schedule: str = 'oneshot'
  prune_batches: int = 8
  prune_every: int = 10
  prune_step: int = 1
  regime: str = 'scratch'
  epochs: int = 160
  batch_size: int = 64
  lr: float = 0.1
  lr_schedule: str = 'step'
  weight_decay: float = 1e-4
  bn_l1: float = 0.0
  finetune_epochs: int = 40
  finetune_lr: float = 1e-3
  scratch_b_cap: float | None = None
  precision: str = 'float32'
  seed: int = 0
  baseline_dir: str | None = None

  def target_name(self) -> str:
    return {'ratio': 'prune_ratio', 'target_macs': 'target_macs', 'preset': 'preset'}[
        select.SELECTIONS[self.selection].needs]


_BASELINE_KEYS = ('model', 'dataset', 'data_path', 'max_train', 'epochs', 'batch_size', 'lr',
                  'lr_schedule', 'weight_decay', 'bn_l1', 'precision', 'seed')
_PRUNE_KEYS = ('criterion', 'selection', 'prune_ratio', 'target_macs', 'preset', 'min_channels',
               'round_to', 'flops_penalty', 'schedule', 'prune_batches', 'prune_every', 'prune_step')
_REGIME_KEYS = {'finetune': ('finetune_epochs', 'finetune_lr'), 'scratch_b': ('scratch_b_cap',)}


def regimes_of(config: Config) -> tuple[str, ...]:
  return regimes.REGIMES if config.regime == 'all' else (config.regime,)


def validate(config: Config) -> None:
  """Checks every value and combination before anything is trained (ConfigError)."""
  choose('model', config.model, models.MODELS)
  choose('dataset', config.dataset, data.DATASETS)
  choose('criterion', config.criterion, criteria.CRITERIA)
  choose('selection', config.selection, select.SELECTIONS)
  choose('schedule', config.schedule, SCHEDULES)
  choose('regime', config.regime, REGIME_CHOICES)
  choose('learning-rate schedule', config.lr_schedule, train.SCHEDULES)
  choose('precision', config.precision, train.PRECISIONS)
  conv.current_impl()  # JAXPRUNE_CONV_IMPL and JAXPRUNE_XLA_OPTIONS, checked before any write
  compiler.choice()
  needs = select.SELECTIONS[config.selection].needs
  given = {'ratio': config.prune_ratio, 'target_macs': config.target_macs, 'preset': config.preset}
  flag = {'ratio': '--prune_ratio', 'target_macs': '--target_macs', 'preset': '--preset'}
  if given[needs] is None:
    raise ConfigError(f"--selection={config.selection} needs {flag[needs]}.")
  for other, value in given.items():
    if other != needs and value is not None:
      raise ConfigError(f"--selection={config.selection} takes {flag[needs]}, not {flag[other]}.")
  if config.prune_ratio is not None and not 0 <= config.prune_ratio < 1:
    raise ConfigError(f"--prune_ratio must be in [0, 1), got {config.prune_ratio}.")
  if config.target_macs is not None and not 0 < config.target_macs <= 1:
    raise ConfigError(f"--target_macs must be a fraction of the MACs in (0, 1], got "
                      f"{config.target_macs}.")
  if config.preset is not None:
    choose('preset', config.preset, select.PRESETS)
    family = select.PRESETS[config.preset].models
    if config.model not in family:
      raise ConfigError(f"preset {config.preset!r} is for {' or '.join(family)}, not for "
                        f"{config.model}.")
  if config.schedule == 'iterative' and config.round_to != 1:
    raise ConfigError(f"--round_to={config.round_to} rounds a one-shot selection's widths; "
                      "use it with --schedule=oneshot.")
  if config.schedule == 'iterative' and needs == 'preset':
    raise ConfigError("--schedule=iterative removes channels globally and cannot follow a "
                      "per-layer --preset; use --schedule=oneshot.")
  for name in ('epochs', 'batch_size', 'finetune_epochs', 'prune_batches', 'prune_every',
               'prune_step', 'min_channels', 'round_to'):
    if getattr(config, name) < 1:
      raise ConfigError(f"--{name} must be at least 1, got {getattr(config, name)}.")
  for name in ('lr', 'finetune_lr'):
    if getattr(config, name) <= 0:
      raise ConfigError(f"--{name} must be positive, got {getattr(config, name)}.")
  if config.seed < 0:
    raise ConfigError(f"--seed must be at least 0, got {config.seed}.")
  for name in ('weight_decay', 'bn_l1'):
    if getattr(config, name) < 0:
      raise ConfigError(f"--{name} must be at least 0, got {getattr(config, name)}.")
  if config.scratch_b_cap is not None and config.scratch_b_cap < 1:
    raise ConfigError(f"--scratch_b_cap must be at least 1 (a multiple of --epochs), got "
                      f"{config.scratch_b_cap}.")


def _claim(stage: epath.Path, settings: Mapping) -> None:
  """Records a stage's settings, or refuses a stage directory made with other settings."""
  path = stage / 'stage_config.json'
  if path.exists():
    before = json.loads(path.read_text())
    for key, value in settings.items():
      if key in before and before[key] != value:
        raise ConfigError(f"{stage} was made with {key}={before[key]!r}, not {value!r}; use "
                          "another --workdir (or --baseline_dir) for a different configuration.")
    return
  stage.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(dict(settings), indent=1))


def _settings(config: Config, keys) -> dict:
  return {k: getattr(config, k) for k in keys}


def _optimizer(config: Config) -> train.OptimizerConfig:
  return train.OptimizerConfig(learning_rate=config.lr, schedule=config.lr_schedule,
                               weight_decay=config.weight_decay, bn_l1=config.bn_l1)


def evaluate(model, variables, dataset: data.Dataset, batch_size: int) -> float:
  """Test accuracy of `model` with `variables` (eval mode)."""
  apply = compiler.jit(model.apply)
  correct = 0.0
  for batch in data.eval_batches(dataset.test_images, dataset.test_labels, batch_size,
                                 dataset.spec):
    logits = apply(variables, batch['image'])
    hits = (jnp.argmax(logits, -1) == batch['label']) & batch['valid']
    correct += float(jnp.sum(hits))
  return correct / dataset.num_test


def scoring_batches(dataset: data.Dataset, batch_size: int, count: int, seed: int):
  """`count` unaugmented training batches in a seeded order, for data-driven criteria."""
  order = np.random.default_rng(seed).permutation(dataset.num_train)
  for i in range(min(count, dataset.num_train // batch_size)):
    idx = order[i * batch_size:(i + 1) * batch_size]
    yield {'image': data.normalize(jnp.asarray(dataset.train_images[idx]), dataset.mean,
                                   dataset.std),
           'label': jnp.asarray(dataset.train_labels[idx])}


def _baseline_start(config: Config, dataset, stage: epath.Path):
  """The baseline model and its initial variables (made once, then read from stage/init)."""
  _claim(stage, _settings(config, _BASELINE_KEYS))
  model = models.build(config.model, dataset.num_classes)
  init_path = stage / 'init'
  x = np.zeros((1,) + dataset.image_shape, np.float32)
  like = jax.eval_shape(model.init, jax.random.key(0), x)
  if init_path.exists():
    init = checkpoint.load_variables(init_path, like=like)
  else:
    init = models.init(model, jax.random.key(config.seed), dataset.image_shape)
    checkpoint.save_variables(init_path, init)
  return model, init


def _baseline(config: Config, dataset, arrays, stage: epath.Path):
  model, init = _baseline_start(config, dataset, stage)
  variables, result = train.fit(model, init, arrays, dataset.spec, epochs=config.epochs,
                                batch_size=config.batch_size, optimizer=_optimizer(config),
                                stage_dir=stage, seed=config.seed, precision=config.precision)
  return model, init, variables, result


def _iterative_masks(config, model, structure, variables, dataset, arrays, stage):
  """Alternates fine-tuning steps that accumulate the criterion with global removals ([M], [C])."""
  total = sum(structure.widths[g] for g in structure.prunable)
  if config.prune_ratio is not None:
    removals = int(config.prune_ratio * total)
  else:
    # The number of channels a one-shot MACs selection removes sets the schedule's length;
    # a final one-shot top-up guarantees the target.
    guess = select.select(config.selection, structure,
                          criteria.score('l1', model, variables, None, structure=structure),
                          target_macs=config.target_macs, min_channels=config.min_channels)
    removals = int(sum(structure.widths[g] - m.sum() for g, m in guess.items()))
  rounds = math.ceil(removals / config.prune_step) if removals else 0
  steps_per_epoch = data.steps_per_epoch(dataset.num_train, config.batch_size)
  epochs = max(1, math.ceil(rounds * config.prune_every / steps_per_epoch))
  criterion = criteria.get(config.criterion)
  accumulate = criteria.accumulator(criterion, model)
  normalize = config.selection.endswith('_l2')
  rng = jax.random.key(config.seed)
  masks = {g: np.ones(structure.widths[g], np.float32) for g in structure.prunable}
  progress = {'since': None, 'removed': None}

  def hook(state, batch, current, hook_state):
    if progress['since'] is None:  # first call, or after a resume: one read of the state
      progress['since'] = int(hook_state['since'])
      progress['removed'] = int(hook_state['removed'])
      masks.update({g: np.asarray(m) for g, m in current.items()})
    variables_now = state.variables
    acc = accumulate(hook_state['criterion'], variables_now, current, batch)
    progress['since'] += 1
    if progress['since'] >= config.prune_every and progress['removed'] < removals:
      scores = criterion.finalize(acc, model, variables_now)
      k = min(config.prune_step, removals - progress['removed'])
      host_masks = {g: np.asarray(m) for g, m in current.items()}
      # Same dtype and placement as before, so the train step does not recompile.
      current = {g: jax.device_put(m.astype(host_masks[g].dtype), current[g].sharding)
                 for g, m in select.remove_lowest(
                     structure, scores, host_masks, k, normalize=normalize,
                     flops_penalty=config.flops_penalty,
                     min_channels=config.min_channels).items()}
      masks.update({g: np.asarray(m) for g, m in current.items()})
      progress['removed'] += k
      progress['since'] = 0
      acc = criterion.init(structure, rng)
    return current, {'criterion': acc, 'since': jnp.asarray(progress['since']),
                     'removed': jnp.asarray(progress['removed'])}

  masks_path = stage / 'finetune' / 'masks.json'

  history_path = stage / 'finetune' / 'pruning_curve.jsonl'

  def save_masks(state, record):
    # After every epoch's checkpoint, so a finished (or resumed) stage always has them.
    masks_path.write_text(json.dumps({g: m.tolist() for g, m in masks.items()}))
    live = {g: int(m.sum()) for g, m in masks.items()}
    point = {'epoch': record['epoch'], 'test_accuracy': record['test_accuracy'],
             'channels_removed': int(total - sum(live.values())),
             'macs': flops.count(structure, {**structure.widths, **live}).macs}
    lines = history_path.read_text().splitlines() if history_path.exists() else []
    kept = [l for l in lines if json.loads(l)['epoch'] < record['epoch']]
    history_path.write_text(''.join(l + '\n' for l in kept + [json.dumps(point)]))

  hook_state = {'criterion': criterion.init(structure, rng), 'since': jnp.asarray(0),
                'removed': jnp.asarray(0)}
  finetuned, _ = train.fit(
      model, variables, arrays, dataset.spec, epochs=epochs, batch_size=config.batch_size,
      optimizer=train.OptimizerConfig(learning_rate=config.finetune_lr, schedule='constant',
                                      weight_decay=config.weight_decay),
      stage_dir=stage / 'finetune', seed=config.seed, masks=masks, structure=structure,
      step_hook=hook, hook_state=hook_state, callbacks=(save_masks,),
      precision=config.precision)
  masks = {g: np.asarray(m, np.float32) for g, m in json.loads(masks_path.read_text()).items()}
  if config.target_macs is not None:
    scores = criteria.score(config.criterion, model, finetuned,
                            scoring_batches(dataset, config.batch_size, config.prune_batches,
                                            config.seed), masks=masks, rng=rng,
                            structure=structure)
    masks = select.select(config.selection, structure, scores, target_macs=config.target_macs,
                          min_channels=config.min_channels, flops_penalty=config.flops_penalty,
                          current=masks)
    return masks, finetuned, scores
  return masks, finetuned, None


def _prune(config: Config, model, variables, dataset, arrays, stage: epath.Path):
  _claim(stage, _settings(config, _BASELINE_KEYS + _PRUNE_KEYS))
  structure = structure_lib.derive(model, dataset.image_shape)
  record_path = stage / 'record.json'
  if record_path.exists():
    record = json.loads(record_path.read_text())
    masks = {g: np.asarray(m, np.float32) for g, m in record['masks'].items()}
    widths = record['widths']
    small = checkpoint.load_variables(
        stage / 'variables',
        like=jax.eval_shape(models.build(config.model, dataset.num_classes, widths).init,
                            jax.random.key(0), np.zeros((1,) + dataset.image_shape, np.float32)))
    return structure, masks, widths, small, record
  start = time.time()
  rng = jax.random.key(config.seed)
  if config.schedule == 'oneshot':
    batches = scoring_batches(dataset, config.batch_size, config.prune_batches, config.seed)
    scores = criteria.score(config.criterion, model, variables, batches, rng=rng,
                            structure=structure)
    masks = select.select(config.selection, structure, scores, ratio=config.prune_ratio,
                          target_macs=config.target_macs, preset=config.preset,
                          min_channels=config.min_channels, flops_penalty=config.flops_penalty,
                          round_to=config.round_to)
    source = variables
  else:
    masks, source, scores = _iterative_masks(config, model, structure, variables, dataset,
                                             arrays, stage)
  widths, small, kept = shrink.shrink(structure, source, masks)
  before, after = flops.count(structure), flops.count(structure, widths)
  pruned_model = models.build(config.model, dataset.num_classes, widths)
  record = {
      'criterion': config.criterion, 'selection': config.selection, 'schedule': config.schedule,
      'seed': config.seed, 'widths': widths, 'widths_before': dict(structure.widths),
      'kept': {g: k.tolist() for g, k in kept.items()},
      'masks': {g: np.asarray(m).astype(int).tolist() for g, m in masks.items()},
      'scores': ({g: np.asarray(s).tolist() for g, s in scores.items()}
                 if scores is not None else None),
      'macs_before': before.macs, 'macs_after': after.macs,
      'params_before': before.params, 'params_after': after.params,
      'macs_reduction_percent': 100 * (1 - after.macs / before.macs),
      'params_reduction_percent': 100 * (1 - after.params / before.params),
      'test_accuracy': evaluate(pruned_model, small, dataset, config.batch_size),
      'wall_time_s': time.time() - start,
  }
  checkpoint.save_variables(stage / 'variables', small)
  record_path.write_text(json.dumps(record))
  return structure, masks, widths, small, record


def _absolute(path: str) -> epath.Path:
  # Orbax needs absolute local paths; gs:// and other URIs are absolute already.
  return epath.Path(path) if '://' in path else epath.Path(path).absolute()


def _load_data(config: Config):
  """The dataset, and its arrays on the devices; refuses a model that cannot take the images."""
  dataset = data.load(config.dataset, data_path=config.data_path, data_dir=config.data_dir,
                      max_train=config.max_train)
  # Builds the model abstractly, so a model that cannot take the images stops here.
  jax.eval_shape(models.build(config.model, dataset.num_classes).init, jax.random.key(0),
                 jax.ShapeDtypeStruct((1,) + dataset.image_shape, jnp.float32))
  return dataset, data.device_put_dataset(dataset)


def _baseline_stage(config: Config) -> epath.Path:
  if config.baseline_dir:
    return _absolute(config.baseline_dir)
  return _absolute(config.workdir) / 'baseline'


def _regime_plan(config: Config, regime: str, pruned: regimes.Pruned, dataset):
  """The regime's stage directory (claimed) and its plan."""
  stage = _absolute(config.workdir) / regime
  _claim(stage, _settings(config, _BASELINE_KEYS + _PRUNE_KEYS + _REGIME_KEYS.get(regime, ())))
  plan = regimes.plan(regime, pruned, model_name=config.model,
                      num_classes=dataset.num_classes, image_shape=dataset.image_shape,
                      epochs=config.epochs, optimizer=_optimizer(config),
                      finetune_epochs=config.finetune_epochs, finetune_lr=config.finetune_lr,
                      scratch_b_cap=config.scratch_b_cap, seed=config.seed)
  return stage, plan


def run(config: Config) -> dict:
  """Runs (or resumes) every stage of `config` and returns the results (also in results.json)."""
  validate(config)
  return _run(config, *_load_data(config))


def _run(config: Config, dataset, arrays) -> dict:
  """`run` on a dataset already loaded (and on the devices) for `config`."""
  workdir = _absolute(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  baseline_stage = _baseline_stage(config)

  logging.info('Stage baseline: %s', baseline_stage)
  model, init, variables, base_result = _baseline(config, dataset, arrays, baseline_stage)
  logging.info('Stage prune: %s with %s', config.criterion, config.selection)
  structure, masks, widths, small, record = _prune(config, model, variables, dataset, arrays,
                                                   workdir / 'prune')
  pruned = regimes.Pruned(structure=structure, masks=masks, widths=widths, variables=small,
                          baseline_init=init)
  before = flops.count(structure)
  rows = [{'stage': 'baseline', 'test_accuracy': base_result['test_accuracy'],
           'macs': before.macs, 'params': before.params, 'epochs': config.epochs,
           'wall_time_s': base_result['wall_time_s']},
          {'stage': 'pruned', 'test_accuracy': record['test_accuracy'],
           'macs': record['macs_after'], 'params': record['params_after'], 'epochs': 0,
           'wall_time_s': record['wall_time_s']}]
  for regime in regimes_of(config):
    stage, plan = _regime_plan(config, regime, pruned, dataset)
    logging.info('Stage %s: %d epochs', regime, plan.epochs)
    regime_model = models.build(config.model, dataset.num_classes, plan.widths)
    _, result = train.fit(regime_model, plan.variables, arrays, dataset.spec,
                          epochs=plan.epochs, batch_size=config.batch_size,
                          optimizer=plan.optimizer, stage_dir=stage, seed=config.seed,
                          precision=config.precision)
    cost = flops.count(structure, plan.widths)
    rows.append({'stage': regime, 'test_accuracy': result['test_accuracy'], 'macs': cost.macs,
                 'params': cost.params, 'epochs': plan.epochs,
                 'wall_time_s': result['wall_time_s']})
  results = {
      'rows': rows,
      'prune': {k: record[k] for k in ('criterion', 'selection', 'schedule', 'widths',
                                       'macs_reduction_percent', 'params_reduction_percent')},
      'config': dataclasses.asdict(config),
      'versions': _versions(),
      'devices': [d.device_kind for d in jax.devices()],
      'platform': jax.default_backend(),
  }
  (workdir / 'results.json').write_text(json.dumps(results, indent=1))
  return results


# How `run_seeds` trains its copies. Keyed by --seed_batching's values.
SEED_BATCHING = {
    'auto': 'loop on CPUs and GPUs, vmap on TPUs',
    'loop': 'one copy after another through the same compiled steps',
    'vmap': 'every stage whose copies have the same widths as one vmapped program',
}


def seed_batching_for(name: str, backend: str) -> str:
  """'loop' or 'vmap': what `name` (a SEED_BATCHING key) means on `backend`.

  Five resnet20 copies (experiments/bench/seeds.py): on a 2-core CPU vmapped took 1.3-2.1x
  the loop's time; on an H200 GPU 57.0 s against the loop's 54.2 s (both 3.6-3.7x faster
  than five separate runs). So 'auto' loops on both, which also keeps each copy equal to its
  separate run. On TPUs, whose matrix units want large batches, it vmaps (not measured).
  """
  choose('--seed_batching', name, SEED_BATCHING)
  if name == 'auto':
    return 'vmap' if backend == 'tpu' else 'loop'
  return name


def _seed_configs(config: Config, seeds: int) -> list[Config]:
  return [dataclasses.replace(
      config, seed=seed, workdir=f'{config.workdir}/seed{seed}',
      baseline_dir=f'{config.baseline_dir}/seed{seed}' if config.baseline_dir else None)
      for seed in range(config.seed, config.seed + seeds)]


def _train_copies_together(config: Config, copies: list[Config], dataset, arrays) -> None:
  """Trains each stage of the copies, vmapped over every set of copies of equal widths.

  Leaves every copy's stage directories as `run(copy)` would, so that `run` afterwards
  only reads them. Baselines always share their widths; the prune stage (scoring,
  iterative fine-tuning) runs per copy; a regime's copies train together wherever their
  plans have the same widths and length (a per-layer or preset selection gives every
  seed the same widths, a global one usually does not).
  """
  seeds = [c.seed for c in copies]
  baseline_root = _absolute(config.baseline_dir or config.workdir)
  stages = [_baseline_stage(c) for c in copies]
  starts = [_baseline_start(c, dataset, stage) for c, stage in zip(copies, stages)]
  model = starts[0][0]
  logging.info('Stage baseline: seeds %s as one vmapped program', seeds)
  trained = train.fit_copies(model, [init for _, init in starts], arrays, dataset.spec,
                             epochs=config.epochs, batch_size=config.batch_size,
                             optimizer=_optimizer(config), stage_dirs=stages, seeds=seeds,
                             checkpoint_dir=baseline_root / 'vmapped' / 'baseline',
                             precision=config.precision)
  pruned = []
  for c, (_, init), (variables, _) in zip(copies, starts, trained):
    logging.info('Stage prune (seed %d): %s with %s', c.seed, c.criterion, c.selection)
    structure, masks, widths, small, _ = _prune(c, model, variables, dataset, arrays,
                                                _absolute(c.workdir) / 'prune')
    pruned.append(regimes.Pruned(structure=structure, masks=masks, widths=widths,
                                 variables=small, baseline_init=init))
  for regime in regimes_of(config):
    planned = [_regime_plan(c, regime, p, dataset) for c, p in zip(copies, pruned)]
    groups: dict = {}
    for i, (_, plan) in enumerate(planned):
      key = (tuple(sorted(plan.widths.items())), plan.epochs, plan.optimizer)
      groups.setdefault(key, []).append(i)
    for members in groups.values():
      plan = planned[members[0]][1]
      logging.info('Stage %s: seeds %s as one vmapped program, %d epochs', regime,
                   [seeds[i] for i in members], plan.epochs)
      train.fit_copies(models.build(config.model, dataset.num_classes, plan.widths),
                       [planned[i][1].variables for i in members], arrays, dataset.spec,
                       epochs=plan.epochs, batch_size=config.batch_size,
                       optimizer=plan.optimizer, stage_dirs=[planned[i][0] for i in members],
                       seeds=[seeds[i] for i in members],
                       checkpoint_dir=_absolute(config.workdir) / 'vmapped' / regime,
                       precision=config.precision)


def run_seeds(config: Config, seeds: int, seed_batching: str = 'auto') -> dict:
  """Runs `config` for seeds config.seed .. config.seed + seeds - 1 and reports mean ± std.

  Copy i is the run `run(replace(config, seed=config.seed + i))` in workdir/seed{seed}
  (and baseline_dir/seed{seed}). `seed_batching` (SEED_BATCHING) says how the copies
  train: 'loop' runs them one after another through shared compiled steps, each exactly
  its separate run where the backend's kernels are deterministic (the CPU; on a GPU XLA's
  are not by default); 'vmap' trains the stages whose copies have equal widths as one
  vmapped program (`train.fit_copies`: equal to the separate runs up to float rounding).
  """
  if seeds < 1:
    raise ConfigError(f"--seeds must be at least 1, got {seeds}.")
  batching = seed_batching_for(seed_batching, jax.default_backend())
  if seeds == 1:
    return run(config)
  validate(config)
  # The copies differ only in seed and directories: one dataset (a --max_train subset is
  # the same for every seed) serves them all.
  dataset, arrays = _load_data(config)
  copies = _seed_configs(config, seeds)
  if batching == 'vmap':
    _train_copies_together(config, copies, dataset, arrays)
  per_seed = []
  for c in copies:
    logging.info('Seed %d (%d of %d)', c.seed, c.seed - config.seed + 1, seeds)
    per_seed.append(_run(c, dataset, arrays))
  rows = []
  for i, row in enumerate(per_seed[0]['rows']):
    values = {k: np.array([r['rows'][i][k] for r in per_seed], float)
              for k in ('test_accuracy', 'macs', 'params', 'epochs', 'wall_time_s')}
    rows.append({'stage': row['stage'], **{k: float(v.mean()) for k, v in values.items()},
                 'test_accuracy_std': float(values['test_accuracy'].std(ddof=1)),
                 'seeds': len(per_seed)})
  results = {'rows': rows, 'per_seed': per_seed, 'config': dataclasses.asdict(config),
             'seeds': seeds, 'seed_batching': batching, 'versions': _versions(),
             'devices': [d.device_kind for d in jax.devices()], 'platform': jax.default_backend()}
  (_absolute(config.workdir) / 'results.json').write_text(json.dumps(results, indent=1))
  return results


def _versions() -> dict:
  import flax
  import optax
  import orbax.checkpoint
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jax.lib.__version__ if hasattr(jax.lib, '__version__') else None,
          'flax': flax.__version__, 'optax': optax.__version__,
          'orbax-checkpoint': orbax.checkpoint.__version__, 'numpy': np.__version__}


def format_table(results: Mapping) -> str:
  """The summary table: one row per stage."""
  spread = 'test_accuracy_std' in results['rows'][0]
  accuracy = 'test acc (mean ± std)' if spread else 'test acc'
  width = 21 if spread else 9
  header = (f"{'stage':<10} {accuracy:>{width}} {'MACs':>10} {'params':>10} {'epochs':>7} "
            f"{'time':>8}")
  lines = [header, '-' * len(header)]
  for row in results['rows']:
    acc = f"{100 * row['test_accuracy']:.2f}%"
    if spread:
      acc += f" ± {100 * row['test_accuracy_std']:.2f}"
    lines.append(f"{row['stage']:<10} {acc:>{width}} "
                 f"{row['macs'] / 1e6:>9.2f}M {row['params'] / 1e6:>9.3f}M {row['epochs']:>7g} "
                 f"{row['wall_time_s']:>7.1f}s")
  return '\n'.join(lines)
