"""The optimizer of every training run (`make_optimizer`) and its learning rate at every step
(`learning_rates`), a `train_step` input, so that no schedule is part of a compiled program."""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxprune.errors import ConfigError, choose


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """SGD settings; the defaults are [R]'s CIFAR baseline (lr 0.1 x0.1 at 50% and 75%, wd 1e-4).

  Attributes:
    learning_rate: initial (peak) learning rate.
    schedule: one of SCHEDULES: 'step' (x decay_factor at each milestone), 'cosine'
      (to zero at the end of training), 'constant'.
    decay_fractions: 'step' milestones as fractions of the epochs; milestone epoch =
      int(fraction * epochs) (so 170 epochs decay at 85 and 127).
    decay_epochs: explicit 'step' milestones in epochs; when given, replaces decay_fractions.
    decay_factor: the 'step' multiplier at each milestone.
    momentum: heavy-ball momentum (PyTorch convention: buf = momentum * buf + grad).
    weight_decay: coupled L2 decay: weight_decay * param is added to every gradient.
    bn_l1: network slimming's sparsity s: s * sign(gamma) is added to every BN scale's gradient.
  """
  learning_rate: float = 0.1
  schedule: str = 'step'
  decay_fractions: tuple[float, ...] = (0.5, 0.75)
  decay_epochs: tuple[int, ...] | None = None
  decay_factor: float = 0.1
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 1e-4
  bn_l1: float = 0.0


def _step_schedule(cfg: OptimizerConfig, epochs: int, steps_per_epoch: int) -> optax.Schedule:
  if cfg.decay_epochs is not None:
    milestones = list(cfg.decay_epochs)
    bad = [m for m in milestones if int(m) != m or not 0 <= m <= epochs]
    if bad:
      raise ConfigError(f"decay_epochs {bad} are not whole epochs in [0, {epochs}].",
                        settings=('decay_epochs',))
  else:
    bad = [f for f in cfg.decay_fractions if not 0 < f < 1]
    if bad:
      raise ConfigError(f"decay_fractions {bad} are not between 0 and 1 (exclusive).",
                        settings=('decay_fractions',))
    milestones = [int(f * epochs) for f in cfg.decay_fractions]
  scales = {}
  for epoch in milestones:
    # Two milestones on the same epoch (very short runs) both apply.
    boundary = int(epoch) * steps_per_epoch
    scales[boundary] = scales.get(boundary, 1.0) * cfg.decay_factor
  return optax.piecewise_constant_schedule(cfg.learning_rate, scales)


SCHEDULES: dict[str, Callable[[OptimizerConfig, int, int], optax.Schedule]] = {
    'step': _step_schedule,
    'cosine': lambda cfg, epochs, spe: optax.cosine_decay_schedule(cfg.learning_rate, epochs * spe),
    'constant': lambda cfg, epochs, spe: optax.constant_schedule(cfg.learning_rate),
}


def learning_rate_schedule(cfg: OptimizerConfig, epochs: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """The learning rate as a function of the optimizer step."""
  choose('learning-rate schedule', cfg.schedule, SCHEDULES, setting='schedule')
  return SCHEDULES[cfg.schedule](cfg, epochs, steps_per_epoch)


def learning_rates(cfg: OptimizerConfig, epochs: int, steps_per_epoch: int) -> np.ndarray:
  """The learning rate of every step of a run: float32, shape (epochs * steps_per_epoch,)."""
  steps = np.arange(epochs * steps_per_epoch, dtype=np.int32)
  rates = learning_rate_schedule(cfg, epochs, steps_per_epoch)(steps)
  # A constant schedule returns a scalar whatever the steps.
  return np.broadcast_to(np.asarray(rates, np.float32), steps.shape)


def add_bn_scale_l1(strength: float) -> optax.GradientTransformation:
  """Network slimming's sparsity: adds strength * sign(gamma) to each BN scale's gradient (every
  leaf Flax names 'scale': every normalisation layer of jaxprune's models is a BatchNorm)."""

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('add_bn_scale_l1 needs the params passed to update().')
    return jax.tree.map(lambda g, p: g + strength * jnp.sign(p), updates, params), state

  def is_bn_scale(params):
    return traverse_util.path_aware_map(lambda path, _: path[-1] == 'scale', params)

  return optax.masked(optax.GradientTransformation(lambda params: optax.EmptyState(), update),
                      is_bn_scale)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """SGD's direction as in the papers: grad + wd * param (+ s * sign(gamma)) -> momentum.

  The result is the momentum buffer (with Nesterov, grad + momentum * buf); `train_step`
  multiplies it by -learning_rate, its input: optax.sgd with the schedule outside the program.
  """
  parts = []
  if cfg.weight_decay:
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  if cfg.bn_l1:
    parts.append(add_bn_scale_l1(cfg.bn_l1))
  if cfg.momentum:
    parts.append(optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov))
  return optax.chain(*parts)


