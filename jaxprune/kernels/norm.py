"""BatchNorm with a hand-written backward pass: nn.BatchNorm's numbers, fewer memory passes.

`BatchNorm` has exactly nn.BatchNorm's variables (params 'scale', 'bias'; batch_stats
'mean', 'var', float32) and computes what jaxprune's models use of it: normalisation over
every axis but the last, batch statistics in training mode (E[x^2] - E[x]^2 clipped at 0,
in float32 whatever the input dtype), running averages updated after initialisation,
running statistics otherwise, the output in the input's and parameters' dtype.

Why: the backward pass JAX derives from nn.BatchNorm keeps x - mean as an extra full-size
tensor and spends three reductions and two elementwise passes per layer;
`batch_norm_train`'s custom VJP needs two reductions and one elementwise pass, a visible
share of a small CIFAR network's train step. The gradient is the exact derivative of the
same function, the returned mean's and variance's cotangents and the clip at zero included.
"""

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _axes(x) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1))


def _normalize(x, mean, rstd, scale, bias):
  """(x - mean) * rstd * scale + bias in float32, in the dtype of x and the parameters."""
  y = (x.astype(jnp.float32) - mean) * (scale.astype(jnp.float32) * rstd) + bias.astype(
      jnp.float32)
  return y.astype(jnp.result_type(x, scale, bias))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon: float):
  """Training-mode BatchNorm over all axes but the last: (y, batch mean, batch variance)."""
  return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, _axes(x32))
  raw_var = jnp.mean(jnp.square(x32), _axes(x32)) - jnp.square(mean)
  var, positive = jnp.maximum(raw_var, 0.), raw_var > 0
  rstd = lax.rsqrt(var + epsilon)
  y = _normalize(x, mean, rstd, scale, bias)
  # bias rides along for its dtype only (its gradient, sum dy, needs nothing else of it).
  return (y, mean, var), (x, mean, rstd, positive, scale, bias)


def _backward(epsilon, residuals, cotangents):
  del epsilon  # Only through rstd, which the residuals carry.
  x, mean, rstd, positive, scale, bias = residuals
  dy, dmean, dvar = cotangents
  x32, dy32 = x.astype(jnp.float32), dy.astype(jnp.float32)
  count = x.size // x.shape[-1]
  centered = x32 - mean
  sum_dy = jnp.sum(dy32, _axes(x))
  dscale = rstd * jnp.sum(dy32 * centered, _axes(x))
  scale32 = scale.astype(jnp.float32)
  multiplier = scale32 * rstd
  # y depends on var through rstd; the clip at zero passes no gradient where it acted.
  dvar_total = jnp.where(positive, dvar - 0.5 * jnp.square(rstd) * scale32 * dscale, 0.)
  # x reaches the loss through y directly, the mean, and var = E[x^2] - mean^2:
  # dx = multiplier * dy + (dmean - multiplier * sum_dy) / n + 2 dvar_total (x - mean) / n.
  dx = (multiplier * dy32 + (dmean - multiplier * sum_dy) / count
        + (2. / count) * dvar_total * centered)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), sum_dy.astype(bias.dtype)


batch_norm_train.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
  """nn.BatchNorm (last-axis features, same fields) trained through `batch_norm_train`."""
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    scale = self.param('scale', self.scale_init, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    if self.use_running_average:
      return _normalize(x, running_mean.value, lax.rsqrt(running_var.value + self.epsilon),
                        scale, bias)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    return y
