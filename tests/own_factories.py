"""Tiny models written without jaxprune, for `--model=own_factories:<factory>` in the tests:
one in Flax NNX and one in Linen, each with BatchNorm and Dropout."""

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx


class NnxCnn(nnx.Module):
  def __init__(self, num_classes: int, channels: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(channels, 8, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 12, (3, 3), strides=2, rngs=rngs)
    self.bn2 = nnx.BatchNorm(12, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.fc = nnx.Linear(12, 16, rngs=rngs)
    self.head = nnx.Linear(16, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    x = self.drop(jnp.mean(x, axis=(1, 2)))
    return self.head(nnx.relu(self.fc(x)))


def nnx_factory(num_classes, image_shape, rngs):
  return NnxCnn(num_classes, image_shape[-1], rngs)


class LinenCnn(nn.Module):
  num_classes: int
  hidden: int = 16

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(12, (3, 3), strides=2)(x)))
    x = nn.Dropout(0.1, deterministic=not train)(jnp.mean(x, axis=(1, 2)))
    hidden = nn.relu(nn.Dense(self.hidden, name='hidden')(x))
    return nn.Dense(self.num_classes, name='head')(hidden)


def linen_factory(num_classes):
  return LinenCnn(num_classes)


def linen_wider_factory(num_classes):
  """The same model with another hidden width: an edited model."""
  return LinenCnn(num_classes, hidden=24)


def not_a_model(num_classes):
  return {'classes': num_classes}


class Wide(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Dense(512, name='hidden')(x.reshape(x.shape[0], -1)))
    return nn.Dense(256, name='head')(x)


def wide_factory(num_classes):
  """A wide hidden layer, to measure a pruned kernel's initial spread."""
  return Wide(num_classes)
