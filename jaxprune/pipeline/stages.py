"""The stages of one run, each a function a notebook can call: baseline -> prune -> retrain.

    data = stages.load_data(config)
    base = stages.baseline(config, data)
    pruned = stages.prune(config, base, data)
    row = stages.retrain(config, 'scratch', pruned, data)

Each stage lives in a directory of the work directory:

    workdir/
      baseline/     (or baseline_dir, shared by many runs) init/, checkpoints, result.json
      prune/        record.json (masks, widths, kept indices, scores, cost, accuracy after
                    pruning), variables/; iterative: finetune/ with pruning_curve.jsonl
      <regime>/     checkpoints, metrics.jsonl, tensorboard/, result.json

Every stage writes `stage_config.json` with the settings that identify it (`claim`): a
directory made with other settings is refused, a finished stage is only read.
"""

import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from jaxprune import data as data_lib
from jaxprune import models, multihost, stream, train
from jaxprune.errors import ConfigError, DataError, Diverged
from jaxprune.pipeline import config as config_lib
from jaxprune.pipeline import iterative, regimes, results, workdir
from jaxprune.prune import criteria, flops, select, shrink, weights
from jaxprune.prune import program as program_lib
from jaxprune.train import checkpoint


@dataclasses.dataclass(frozen=True)
class Data:
  """A dataset on the host, its arrays on the devices and its content's fingerprint."""
  dataset: data_lib.Dataset
  arrays: Mapping
  fingerprint: str


@dataclasses.dataclass(frozen=True)
class Baseline:
  """The trained baseline: its model, initial and final variables, and result.json."""
  model: nn.Module
  init: Mapping
  variables: Mapping
  result: Mapping
  stage: epath.Path


@dataclasses.dataclass(frozen=True)
class PruneOutcome:
  """What the prune stage made: the pruned network for the regimes and its record.json."""
  pruned: regimes.Pruned
  record: Mapping


def absolute(path: str) -> epath.Path:
  # Orbax needs absolute local paths; gs:// and other URIs are absolute already.
  return epath.Path(path) if '://' in path else epath.Path(path).absolute()


def load_data(config) -> Data:
  """The dataset, held on the devices or streamed; refuses a model that cannot take its images."""
  streamed = stream.streams(config.dataset, config.input)
  logging.info('Input: %s %s.', config.dataset, 'streamed batch by batch (grain)' if streamed
               else 'held whole on every device')
  if streamed:
    workers = config.input_workers
    if workers is None:
      workers = max(0, min(16, (os.cpu_count() or 1) - 1))
    dataset = stream.open_stream(config.dataset, data_path=config.data_path,
                                 data_dir=config.data_dir, max_train=config.max_train,
                                 image_size=config.image_size, workers=workers,
                                 pad_mode=config.pad_mode)
  else:
    dataset = data_lib.load(config.dataset, data_path=config.data_path,
                            data_dir=config.data_dir, max_train=config.max_train)
  model = model_builder(config, dataset)(None)
  if isinstance(model, models.OwnModel):
    program_lib.derive_checked(model, dataset.image_shape)
  else:
    models.init_shapes(model, dataset.image_shape)
  if streamed:
    return Data(dataset, dataset, dataset.fingerprint)
  return Data(dataset, data_lib.device_put_dataset(dataset), data_lib.fingerprint(dataset))


def check_feasible(config, data: Data) -> None:
  """ConfigError for what the settings cannot do with this dataset and model: a batch larger
  than the training set or not divisible by the devices, a step beyond the device's memory,
  a selection the model's channels cannot reach."""
  dataset = data.dataset
  devices = jax.device_count()
  for name in ('batch_size', 'finetune_batch_size'):
    batch_size = getattr(config, name)
    if batch_size is not None:
      data_lib.steps_per_epoch(dataset.num_train, batch_size)
      if batch_size % devices:
        raise ConfigError(f'{name} {batch_size} is not divisible by the {devices} devices.',
                          settings=(name,))
  structure = program_lib.derive(model_builder(config, dataset)(None),
                                 dataset.image_shape).structure
  check_memory(config, structure, data)
  # Feasibility depends on the channel counts only, never on the scores' values.
  rng = np.random.default_rng(0)
  scores = {g: rng.random(structure.widths[g]) for g in structure.prunable}
  select_masks(config, structure, scores)


def select_masks(config, structure, scores) -> dict:
  """The one-shot selection's masks, the kept channels redrawn at random if `kept_channels` says."""
  masks = select.select(config.selection, structure, scores, ratio=config.prune_ratio,
                        target_macs=config.target_macs, preset=config.preset,
                        min_channels=config.min_channels, flops_penalty=config.flops_penalty,
                        flops_cost=config.flops_cost, round_to=config.round_to,
                        width_profile=config.width_profile)
  if config.kept_channels == 'random':
    masks = select.random_channels(masks, np.random.default_rng([config.seed, 1]))
  return masks


def device_memory() -> int | None:
  """Bytes the first device may use: an accelerator's allocator limit; on a CPU the memory
  available now (Linux's MemAvailable, else the physical memory); None where unknown."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  with contextlib.suppress(OSError), open('/proc/meminfo') as f:
    for line in f:
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) * 1024
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return None


def check_memory(config, structure, data: Data) -> None:
  """ConfigError when a training step cannot fit a device: `flops.training_bytes` (a lower
  estimate) of the model and its per-device batch, plus the dataset held on the devices."""
  available = device_memory()
  if available is None:
    return
  per_device_batch = max(1, config.batch_size // jax.device_count())
  data_bytes = (0 if isinstance(data.arrays, stream.Stream) else
                sum(int(a.nbytes) for a in jax.tree.leaves(data.arrays)) // jax.device_count())
  needed = flops.training_bytes(structure, per_device_batch) + data_bytes
  if needed > available:
    gib = 2 ** 30
    raise ConfigError(
        f'{config.model} at width_multiplier={config.width_multiplier:g} with batch_size='
        f'{config.batch_size} needs at least {needed / gib:.1f} GiB per device to train '
        f'({flops.count(structure).params:,} parameters) but a device here has '
        f'{available / gib:.1f} GiB; use a smaller width_multiplier, batch_size or model.',
        settings=('width_multiplier', 'batch_size', 'model'))


def check_directories(config, data: Data) -> None:
  """ConfigError if baseline_dir is not a baseline stage or a stage was made with other settings."""
  root = absolute(config.workdir)
  if config.baseline_dir:
    prune_only = [s.name for s in config_lib.SETTINGS
                  if s.stage not in ('run', 'baseline', 'performance')]
    workdir.check_baseline_dir(baseline_stage(config), prune_only, root)
  check_identity(baseline_stage(config), baseline_identity(config, data))
  check_identity(root / 'prune', config_lib.stage_settings(config, 'prune'))
  for regime in config_lib.regimes_of(config):
    check_identity(root / regime, config_lib.stage_settings(config, regime))


def baseline_claim(config):
  """The baseline stage's claim (a context manager): a run finding another training the same
  baseline waits, then reuses it. A finished baseline is only read: no claim."""
  stage = baseline_stage(config)
  if checkpoint.is_done(stage):
    return contextlib.nullcontext()
  return workdir.claimed(stage, wait=True, what=f'baseline {stage}', settings=('baseline_dir',))


def model_builder(config, dataset: data_lib.Dataset) -> Callable[[Mapping | None], nn.Module]:
  """widths -> the configured model with those widths (None: its default widths; an own
  model's kept channels per group)."""
  return functools.partial(models.build, config.model, dataset.num_classes,
                           performance=config_lib.performance_options(config),
                           width_multiplier=config.width_multiplier,
                           bn_scale_init=config.bn_scale_init, dense_init=config.dense_init,
                           resnet_shortcut=config.resnet_shortcut, image_shape=dataset.image_shape)


def optimizer(config) -> train.OptimizerConfig:
  return train.OptimizerConfig(learning_rate=config.lr, schedule=config.lr_schedule,
                               decay_epochs=config_lib.decay_epochs(config),
                               decay_factor=config.lr_decay_factor,
                               weight_decay=config.weight_decay, bn_l1=config.bn_l1)


def data_spec(config, data: Data) -> data_lib.DataSpec:
  """The augmentation and normalisation every training stage of `config` uses."""
  return dataclasses.replace(data.dataset.spec, pad_mode=config.pad_mode)


def train_options(config, epochs: int, optimizer_config: train.OptimizerConfig,
                  batch_size: int | None = None):
  return train.TrainOptions(epochs=epochs, batch_size=batch_size or config.batch_size,
                            optimizer=optimizer_config, precision=config.precision,
                            steps_per_call=config.steps_per_call)


def finetune_batch_size(config) -> int:
  return config.finetune_batch_size or config.batch_size


def stage_record(config) -> dict:
  """What every stage's result.json records besides its numbers."""
  return {'performance': config_lib.performance_options(config).as_dict()}


DATA_FINGERPRINT = 'data_fingerprint'
MODEL_DIGEST = 'model_program_digest'


def _refusal(stage: epath.Path, key: str, before, value) -> ConfigError:
  if key == DATA_FINGERPRINT:
    return ConfigError(f'{stage} was trained on other data (the dataset\'s contents differ '
                       'from when it was made, though its settings are the same); use another '
                       'workdir (or baseline_dir) for this data.',
                       settings=('workdir', 'baseline_dir'))
  if key == MODEL_DIGEST:
    return ConfigError(f'{stage} was trained on another version of the model (its program '
                       'differs from when it was made, though its name is the same); use '
                       'another workdir (or baseline_dir) for the edited model.',
                       settings=('workdir', 'baseline_dir'))
  return ConfigError(f'{stage} was made with {key}={before!r}, not {value!r}; use '
                     'another workdir (or baseline_dir) for a different configuration.',
                     settings=(key, 'workdir', 'baseline_dir'))


def check_identity(stage: epath.Path, settings: Mapping) -> tuple[dict | None, dict]:
  """(the stored identity or None, {setting: stored value} where `settings` differ); ConfigError
  if `stage` holds work computed with other `settings` (a diverged stage may change its
  retunable settings, an unstarted one any). Settings its identity lacks count as unchanged."""
  before = workdir.identity(stage)
  if before is None:
    return None, {}
  changed = {k: before[k] for k, v in settings.items() if k in before and before[k] != v}
  if not changed or workdir.unstarted(stage):
    return before, changed
  diverged = (stage / checkpoint.DIVERGED).exists()
  for key, value in changed.items():
    if not (diverged and key in config_lib.BY_NAME and config_lib.BY_NAME[key].retunable):
      raise _refusal(stage, key, value, settings[key])
  return before, changed


def claim(stage: epath.Path, settings: Mapping) -> None:
  """Records a stage's identifying settings (process 0 for all), or refuses a directory made
  with other ones: a diverged stage takes other retunable settings (the learning rates) and
  resumes, an unstarted one any settings (its initial variables made again)."""
  def record() -> None:
    before, changed = check_identity(stage, settings)
    path = stage / workdir.STAGE_CONFIG
    shown = ', '.join(f'{k}={settings[k]!r}' for k in changed)
    if before is None or (changed and workdir.unstarted(stage)):
      stage.mkdir(parents=True, exist_ok=True)
      if before is not None:
        logging.warning('%s held nothing computed yet; it now has %s.', stage, shown)
        if (stage / 'init').exists():
          (stage / 'init').rmtree()
      checkpoint.write_text(path, json.dumps(dict(settings), indent=1))
      return
    if changed:
      logging.warning('%s diverged before; resuming it with %s.', stage, shown)
    if changed or not settings.keys() <= before.keys():
      try:
        checkpoint.write_text(path, json.dumps({**before, **settings}, indent=1))
      except OSError as error:
        # Read-only storage: a finished stage is still read; recording new entries waits.
        if error.errno not in workdir.READ_ONLY_ERRNOS or changed:
          raise

  multihost.agree(f'identity of {stage}', record)


def baseline_identity(config, data: Data) -> dict:
  """The baseline's settings and data fingerprint (the same file with other contents is another
  baseline), and for an own model a digest of its traced program (so is an edited model)."""
  identity = {**config_lib.stage_settings(config, 'baseline'), DATA_FINGERPRINT: data.fingerprint}
  model = model_builder(config, data.dataset)(None)
  if isinstance(model, models.OwnModel):
    identity[MODEL_DIGEST] = model.digest()
  return identity


def baseline_stage(config) -> epath.Path:
  if config.baseline_dir:
    return absolute(config.baseline_dir)
  return absolute(config.workdir) / 'baseline'


def baseline_start(config, data: Data) -> tuple[nn.Module, Mapping, epath.Path]:
  """The model, its initial variables (made once, then read from stage/init) and claimed stage."""
  stage = baseline_stage(config)
  claim(stage, baseline_identity(config, data))
  model = model_builder(config, data.dataset)(None)
  init_path = stage / 'init'
  init = None
  if init_path.exists():
    try:
      init = checkpoint.load_variables(
          init_path, like=models.init_shapes(model, data.dataset.image_shape))
    except DataError as damage:
      logging.warning('%s Making them again from the model and seed.', damage)
  if init is None:
    init = models.init(model, jax.random.key(config.seed), data.dataset.image_shape)
    checkpoint.save_variables(init_path, init)
  return model, init, stage


def train_stage(stage: epath.Path, model: nn.Module, variables: Mapping, arrays: Mapping,
                spec: data_lib.DataSpec, options: train.TrainOptions, *, seed: int,
                record: Mapping, **fit_args) -> tuple[Mapping, dict]:
  """`train.fit` in a stage directory (`fit_args`: fit's other arguments, e.g. masks), as
  `_trained` says. Returns (variables, result): fit's summary with `record`'s entries."""
  [trained] = _trained([stage], [variables], options, record, lambda: [train.fit(
      model, variables, arrays, spec, options, stage_dir=stage, seed=seed, **fit_args)])
  return trained


def train_stage_copies(model: nn.Module, variables, arrays: Mapping, spec: data_lib.DataSpec,
                       options: train.TrainOptions, *, stage_dirs, seeds, checkpoint_dir,
                       record: Mapping) -> list[tuple[Mapping, dict]]:
  """`train_stage` of K copies of equal widths as one vmapped program (`train.fit_copies`,
  its checkpoints in checkpoint_dir); each copy's stage ends as its own `train_stage` would."""
  return _trained([epath.Path(d) for d in stage_dirs], variables, options, record,
                  lambda: train.fit_copies(model, variables, arrays, spec, options,
                                           stage_dirs=stage_dirs, seeds=seeds,
                                           checkpoint_dir=checkpoint_dir))


def _trained(stages, inits, options, record, fit) -> list[tuple[Mapping, dict]]:
  """The stages' (variables, result): read when every stage is done (and its final/ restores),
  else `fit()` and each unfinished stage's final/ and result.json written; a signal during the
  last steps or the writes stops the run once they are written. When fit diverges every stage
  gets diverged.json (a rerun may then change its learning rates) and none is recorded done."""
  if all(checkpoint.is_done(stage) for stage in stages):
    finals = [checkpoint.load_final(stage, like=v) for stage, v in zip(stages, inits)]
    if all(final is not None for final in finals):
      logging.info('%s done; using the saved results.', ', '.join(map(str, stages)))
      return [(final, checkpoint.read_result(stage)) for stage, final in zip(stages, finals)]
  for stage in stages:
    stage.mkdir(parents=True, exist_ok=True)
  out = []
  with checkpoint.SIGNALS.deferred():
    try:
      trained = fit()
    except Diverged as diverged:
      for stage in stages:
        checkpoint.mark_diverged(stage, epoch=diverged.epoch, step=diverged.step,
                                 resume_step=diverged.resume_step,
                                 learning_rate=options.optimizer.learning_rate)
      raise
    for stage, (variables, summary) in zip(stages, trained):
      if checkpoint.is_done(stage):  # Written before a stop between the copies' writes.
        out.append((variables, checkpoint.read_result(stage)))
        continue
      result = {**record, **summary}
      checkpoint.save_variables(stage / checkpoint.FINAL, variables)
      checkpoint.clear_diverged(stage)
      checkpoint.mark_done(stage, result)
      out.append((variables, result))
    if checkpoint.SIGNALS.noted is not None:  # It came after the last preemption check.
      raise checkpoint.SIGNALS.stop(trained[0][1]['steps'], str(stages[0]))
  return out


def baseline(config, data: Data) -> Baseline:
  """Trains (or resumes, or reads) the baseline."""
  model, init, stage = baseline_start(config, data)
  logging.info('Stage baseline: %s', stage)
  variables, result = train_stage(stage, model, init, data.arrays, data_spec(config, data),
                                  train_options(config, config.epochs, optimizer(config)),
                                  seed=config.seed, record=stage_record(config))
  return Baseline(model, init, variables, result, stage)


def scoring_batches(dataset: data_lib.Dataset | stream.Stream, batch_size: int, count: int,
                    seed: int):
  """`count` unaugmented training batches in a seeded order, for data-driven criteria."""
  if isinstance(dataset, stream.Stream):
    batches = stream.scoring_batches(dataset, batch_size, count, seed)
  else:
    order = np.random.default_rng(seed).permutation(dataset.num_train)
    chunks = (order[i * batch_size:(i + 1) * batch_size]
              for i in range(min(count, dataset.num_train // batch_size)))
    batches = ({'image': dataset.train_images[idx], 'label': dataset.train_labels[idx]}
               for idx in chunks)
  for host in batches:
    yield {'image': data_lib.normalize(jnp.asarray(host['image']), dataset.mean, dataset.std),
           'label': jnp.asarray(host['label'])}


def _write_outcome(config, stage: epath.Path, pruned: regimes.Pruned, network: nn.Module,
                   data: Data, record: Mapping, start: float) -> PruneOutcome:
  """Evaluates the pruned `network` and writes the prune stage: its variables, and `record`
  with the entries of every granularity (cost, accuracy, time) as record.json."""
  before, after = flops.count(pruned.structure), pruned.cost()
  test = train.evaluate_variables(network, pruned.variables, data.arrays, data.dataset.spec,
                                  batch_size=config.batch_size, precision=config.precision)
  record = {
      **record,
      'macs_before': before.macs, 'macs_after': after.macs,
      'params_before': before.params, 'params_after': after.params,
      'macs_reduction_percent': 100 * (1 - after.macs / before.macs),
      'params_reduction_percent': 100 * (1 - after.params / before.params),
      'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
      'wall_time_s': time.time() - start,
      **stage_record(config),
  }
  checkpoint.save_variables(stage / 'variables', pruned.variables)
  checkpoint.write_text(stage / 'record.json', json.dumps(record))
  return PruneOutcome(pruned, record)


def _finished_prune(stage: epath.Path,
                   read: Callable[[Mapping], PruneOutcome]) -> PruneOutcome | None:
  """The finished prune stage's outcome, `read` from its record.json; None if the stage has
  not finished or is damaged (logged): then it is computed again from the baseline."""
  record_path = stage / 'record.json'
  if not record_path.exists():
    return None
  try:
    return read(checkpoint.read_json(record_path))
  except DataError as damage:
    logging.warning('%s Computing the prune stage again from the baseline.', damage)
    return None


def prune(config, base: Baseline, data: Data) -> PruneOutcome:
  """Scores, selects and shrinks the baseline (or reads the finished prune stage)."""
  stage = absolute(config.workdir) / 'prune'
  claim(stage, config_lib.stage_settings(config, 'prune'))
  logging.info('Stage prune: %s with %s', config.criterion, config.selection)
  dataset = data.dataset
  prog = program_lib.derive(base.model, dataset.image_shape)
  if config.granularity == 'weight':
    return prune_weights(config, base, data, stage, prog)
  structure = prog.structure
  build = model_builder(config, dataset)

  batches = functools.partial(scoring_batches, dataset, config.batch_size, config.prune_batches,
                              config.seed)

  def read(record: Mapping) -> PruneOutcome:
    masks = {g: np.asarray(m, np.float32) for g, m in record['masks'].items()}
    widths = record['widths']
    kept = {g: np.asarray(k, np.int64) for g, k in record['kept'].items()}
    small = checkpoint.load_variables(stage / 'variables', like=models.init_shapes(
        build(regimes.architecture(base.model, widths, kept)), dataset.image_shape))
    return PruneOutcome(regimes.Pruned(prog, masks, widths, small, base.init, kept=kept), record)

  finished = _finished_prune(stage, read)
  if finished is not None:
    return finished
  start = time.time()
  if config.schedule == 'oneshot':
    scores = criteria.score(config.criterion, prog, base.variables, batches(),
                            rng=jax.random.key(config.seed))
    masks = select_masks(config, structure, scores)
    source = base.variables
  else:
    finetune = train.OptimizerConfig(learning_rate=config.finetune_lr, schedule='constant',
                                     weight_decay=config.weight_decay)
    masks, source, scores = iterative.prune(
        config, base.model, prog, base.variables, data, stage,
        options=train_options(config, 1, finetune, finetune_batch_size(config)),
        spec=data_spec(config, data), scoring_batches=batches)
  widths, small, kept = shrink.shrink(prog, source, masks)
  pruned = regimes.Pruned(prog, masks, widths, small, base.init, kept=kept)
  record = {
      'criterion': config.criterion, 'selection': config.selection, 'schedule': config.schedule,
      'seed': config.seed, 'widths': widths, 'widths_before': dict(structure.widths),
      'kept': {g: k.tolist() for g, k in kept.items()},
      'masks': {g: np.asarray(m).astype(int).tolist() for g, m in masks.items()},
      'scores': ({g: np.asarray(s).tolist() for g, s in scores.items()}
                 if scores is not None else None),
  }
  return _write_outcome(config, stage, pruned, build(pruned.architecture), data, record, start)


def prune_weights(config, base: Baseline, data: Data, stage: epath.Path,
                  prog: program_lib.Program) -> PruneOutcome:
  """Weight-level pruning (`prune.weights`): masks the baseline's conv weights by |w|, or
  reads the finished stage. The network keeps its widths; record.json holds every masked
  kernel's kept fraction, variables/ the masked weights with their masks."""
  structure = prog.structure

  def read(record: Mapping) -> PruneOutcome:
    like_masks = traverse_util.unflatten_dict(
        {key: jax.ShapeDtypeStruct(structure.shapes[('params',) + key], jnp.float32)
         for key in weights.conv_kernels(structure)})
    like = {**jax.eval_shape(lambda: dict(base.variables)), train.WEIGHT_MASKS: like_masks}
    variables = checkpoint.load_variables(stage / 'variables', like=like)
    weight_masks = jax.tree.map(np.asarray, variables[train.WEIGHT_MASKS])
    return PruneOutcome(regimes.Pruned(prog, {}, dict(structure.widths), variables,
                                       base.init, weight_masks), record)

  finished = _finished_prune(stage, read)
  if finished is not None:
    return finished
  start = time.time()
  weight_masks = weights.magnitude_masks(structure, base.variables['params'],
                                         config.prune_ratio, config.selection)
  variables = regimes.masked_start(base.variables, weight_masks)
  pruned = regimes.Pruned(prog, {}, dict(structure.widths), variables, base.init, weight_masks)
  record = {
      'criterion': config.criterion, 'selection': config.selection, 'schedule': config.schedule,
      'granularity': config.granularity, 'seed': config.seed,
      'widths': dict(structure.widths), 'widths_before': dict(structure.widths),
      'kept_weight_fraction': weights.kept_fraction(weight_masks),
      'kernel_densities': weights.densities(weight_masks),
  }
  return _write_outcome(config, stage, pruned, base.model, data, record, start)


def regime_plan(config, regime: str, pruned: regimes.Pruned,
                data: Data) -> tuple[epath.Path, regimes.Plan]:
  """The regime's stage directory (claimed) and its plan."""
  stage = absolute(config.workdir) / regime
  claim(stage, config_lib.stage_settings(config, regime))
  return stage, regimes.plan(
      regime, pruned, build=model_builder(config, data.dataset),
      image_shape=data.dataset.image_shape, epochs=config.epochs, optimizer=optimizer(config),
      finetune_epochs=config.finetune_epochs, finetune_lr=config.finetune_lr,
      scratch_b_cap=config.scratch_b_cap, seed=config.seed, reduced_match=config.reduced_match,
      finetune_batch_size=finetune_batch_size(config), lottery_style=config.lottery_style)


def retrain(config, regime: str, pruned: regimes.Pruned, data: Data) -> dict:
  """Trains (or resumes, or reads) one regime; returns its row of the summary table."""
  stage, plan = regime_plan(config, regime, pruned, data)
  logging.info('Stage %s: %d epochs', regime, plan.epochs)
  _, result = train_stage(stage, plan.network(model_builder(config, data.dataset)),
                          plan.variables, data.arrays, data_spec(config, data),
                          train_options(config, plan.epochs, plan.optimizer, plan.batch_size),
                          seed=config.seed, record=regime_record(config, plan, pruned, data))
  return regime_row(regime, result, stage)


def regime_record(config, plan: regimes.Plan, pruned: regimes.Pruned, data: Data) -> dict:
  """What a regime's result.json records besides its numbers: its network's widths and
  cost, so the summary can show a finished regime without planning it again."""
  cost = plan.cost(pruned.structure, data.dataset.image_shape)
  return {**stage_record(config), 'macs': cost.macs, 'params': cost.params,
          'widths': dict(plan.widths)}


def best_test_accuracy(stage: epath.Path, result: Mapping) -> float:
  """The best epoch's test accuracy (from the metrics where the result predates recording it)."""
  if 'best_test_accuracy' in result:
    return result['best_test_accuracy']
  return max([r['test_accuracy'] for r in checkpoint.read_metrics(stage)],
             default=result['test_accuracy'])


def regime_row(regime: str, result: Mapping, stage: epath.Path) -> dict:
  """A regime's summary row, with the regime's own settings its stage was made with: a work
  directory gathers regimes finished by calls with other regime settings."""
  recorded = workdir.identity(stage) or {}
  return {'stage': regime, 'test_accuracy': result['test_accuracy'],
          'best_test_accuracy': best_test_accuracy(stage, result), 'macs': result['macs'],
          'params': result['params'], 'epochs': result['epochs'],
          'wall_time_s': result['wall_time_s'], 'widths': result.get('widths'),
          'settings': {s.name: recorded[s.name] for s in config_lib.SETTINGS
                       if s.stage == regime and s.name in recorded}}


def finished_rows(config, regimes_run: tuple[str, ...]) -> list[dict]:
  """The rows of the regimes other calls finished in the work directory, in `regimes.REGIMES`
  order (less those without a recorded cost, and damaged ones: logged)."""
  rows = []
  for regime in regimes.REGIMES:
    stage = absolute(config.workdir) / regime
    if regime in regimes_run or not checkpoint.is_done(stage):
      continue
    try:
      result = checkpoint.read_result(stage)
      if 'macs' in result:
        rows.append(regime_row(regime, result, stage))
    except DataError as damage:
      logging.warning('%s Until then the %s row is left out of results.json.', damage, regime)
  return rows


def run_one(config, data: Data) -> dict:
  """Every stage of one seed's run; returns (and writes) its results.json."""
  absolute(config.workdir).mkdir(parents=True, exist_ok=True)
  with baseline_claim(config):
    base = baseline(config, data)
  outcome = prune(config, base, data)
  record = outcome.record
  rows = [{'stage': 'baseline', 'test_accuracy': base.result['test_accuracy'],
           'best_test_accuracy': best_test_accuracy(base.stage, base.result),
           'macs': record['macs_before'], 'params': record['params_before'],
           'epochs': config.epochs, 'wall_time_s': base.result['wall_time_s']},
          {'stage': 'pruned', 'test_accuracy': record['test_accuracy'],
           'best_test_accuracy': record['test_accuracy'],
           'macs': record['macs_after'], 'params': record['params_after'], 'epochs': 0,
           'wall_time_s': record['wall_time_s']}]
  regimes_run = config_lib.regimes_of(config)
  rows += [retrain(config, regime, outcome.pruned, data) for regime in regimes_run]
  rows += finished_rows(config, regimes_run)
  order = ('baseline', 'pruned', *regimes.REGIMES)
  rows.sort(key=lambda row: order.index(row['stage']))
  prune_summary = {k: record[k] for k in ('criterion', 'selection', 'schedule', 'widths',
                                          'macs_reduction_percent', 'params_reduction_percent')}
  return results.write(config, {'rows': rows, 'prune': prune_summary})
