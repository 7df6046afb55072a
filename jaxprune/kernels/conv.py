"""A 2-D convolution with nn.Conv's parameters, computed the fastest way on each backend.

`Conv` is an `nn.Conv` subclass (so MAC counting sees it) that creates exactly nn.Conv's
parameters: no parameter path, shape or initial value changes. Only NHWC inputs,
feature_group_count 1, no dilation and no mask are supported; padding is 'SAME', 'VALID'
or (low, high) pairs. Its `impl`, a key of `jaxprune.kernels.options.CONV_IMPLS`, picks
the formulation: 'native' (`conv_native`, what nn.Conv does), 'patches' (`conv_patches`,
one matmul, the same result to rounding) or 'auto': on the CPU, 'patches' when the output
map has at most PATCHES_MAX_OUTPUT_PIXELS positions (where XLA's CPU convolution is many
times slower), else 'native' with `conv_canonical`'s gradients, the input going through
`materialize`; elsewhere plain 'native'.
"""

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxprune.kernels.options import CONV_IMPLS

# 'auto' on the CPU: the largest output map (H_out * W_out) computed as patches.
PATCHES_MAX_OUTPUT_PIXELS = 4


def choose_impl(impl: str, output_spatial: Sequence[int], backend: str | None = None) -> str:
  """The formulation (a key of FORMULATIONS) of one convolution: `impl`, or for 'auto' the
  rule for an output map of `output_spatial` (H_out, W_out) on `backend` (default JAX's)."""
  # Models pass a PerformanceOptions value, checked when it was made: anything else is a bug.
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv implementation {impl!r} is not one of {', '.join(CONV_IMPLS)}.")
  if impl != 'auto':
    return impl
  if (backend or jax.default_backend()) != 'cpu':
    return 'native'
  pixels = math.prod(int(d) for d in output_spatial)
  return 'patches' if pixels <= PATCHES_MAX_OUTPUT_PIXELS else 'native'


def _pads(spatial, kernel_size, strides, padding) -> tuple[tuple[int, int], ...]:
  """Explicit (low, high) pads per spatial dim, as lax.conv_general_dilated computes them."""
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID'):
      raise ValueError(f"conv padding {padding!r} is not supported; use 'SAME', 'VALID' or "
                       "(low, high) pairs.")
    pads = lax.padtype_to_pads(spatial, kernel_size, strides, padding)
  else:
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  return tuple((int(lo), int(hi)) for lo, hi in pads)


def conv_patches(x, kernel, strides, pads, precision=None):
  """`conv_native`'s result as im2col + one matmul. The kh*kw strided views of the padded
  input are concatenated along channels in (row, column, channel) order, the HWIO kernel's
  row-major order, so the kernel is only reshaped, never transposed."""
  n, h, w, c = x.shape
  kh, kw, _, o = kernel.shape
  (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
  ho = (h + pt + pb - kh) // sh + 1
  wo = (w + pl + pr - kw) // sw + 1
  if (pt, pb, pl, pr) != (0, 0, 0, 0):
    # lax.pad also takes negative pads (cropping), as conv_general_dilated does.
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  views = [lax.slice(x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                     (1, sh, sw, 1))
           for i in range(kh) for j in range(kw)]
  patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
  return lax.dot_general(patches, kernel.reshape(kh * kw * c, o), (((3,), (0,)), ((), ())),
                         precision=precision)


def materialize(x, kernel):
  """x / one, with `one` a runtime 1.0 (from the kernel): bitwise x, computed once by XLA.

  XLA's CPU fusion recomputes a cheap elementwise producer inside every consumer, so along a
  residual stream each kernel-gradient transpose re-derived the stage's whole chain of
  blocks; XLA does not duplicate a division. sign(|k| + 1) is 1 for every non-NaN k; a NaN
  kernel makes the output NaN, as the convolution would anyway.
  """
  one = lax.stop_gradient(lax.sign(lax.abs(kernel.reshape(-1)[0]) + 1))
  return x / one.astype(x.dtype)


def conv_native(x, kernel, strides, pads, precision=None):
  """NHWC x HWIO `lax.conv_general_dilated` with explicit pads (what nn.Conv computes)."""
  return lax.conv_general_dilated(x, kernel, strides, pads,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_canonical(x, kernel, strides, pads, precision=None):
  """`conv_native` with both backward convolutions in the forward's NHWC x HWIO layout.

  XLA:CPU rewrites JAX's own backward convolutions into that layout only in the entry
  computation; inside a loop body (`steps_per_call` > 1) they stay generic and tens of times
  slower. The gradients are lax's bit for bit.
  """
  return conv_native(x, kernel, strides, pads, precision)


def _conv_canonical_forward(x, kernel, strides, pads, precision):
  return conv_native(x, kernel, strides, pads, precision), (x, kernel)


def _conv_canonical_backward(strides, pads, precision, residuals, cotangent):
  x, kernel = residuals
  input_pads, kernel_pads = [], []
  for size, out, k, s, (low, _) in zip(x.shape[1:3], cotangent.shape[1:3], kernel.shape[:2],
                                       strides, pads):
    # The paddings of lax's own convolution VJPs (no dilation of the forward pass).
    out_dilated = (out - 1) * s + 1
    before = k - low - 1
    input_pads.append((before, size + k - 1 - out_dilated - before))
    kernel_pads.append((low, out_dilated - size + k - low - 1))
  # Input gradient: the cotangent, dilated by the strides, convolved with the spatially
  # flipped kernel whose in and out axes are swapped (HWOI read as HWIO).
  flipped = lax.rev(kernel, (0, 1)).transpose(0, 1, 3, 2)
  dx = lax.conv_general_dilated(cotangent, flipped.astype(cotangent.dtype), (1, 1),
                                input_pads, lhs_dilation=strides,
                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)
  # Kernel gradient: the input as (C, H, W, N) convolved with the cotangent as (H, W, N, O),
  # dilated by the strides: (C, kh, kw, O), then back to HWIO.
  dk = lax.conv_general_dilated(x.transpose(3, 1, 2, 0),
                                cotangent.transpose(1, 2, 0, 3).astype(x.dtype), (1, 1),
                                kernel_pads, rhs_dilation=strides,
                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)
  return dx.astype(x.dtype), dk.transpose(1, 2, 0, 3).astype(kernel.dtype)


conv_canonical.defvjp(_conv_canonical_forward, _conv_canonical_backward)

FORMULATIONS = {'native': conv_native, 'patches': conv_patches}


class Conv(nn.Conv):
  """nn.Conv computed as its `impl` (a key of CONV_IMPLS) says: see the module docstring."""
  impl: str = 'auto'

  @nn.compact
  def __call__(self, inputs):
    kernel_size = ((self.kernel_size,) * 2 if isinstance(self.kernel_size, int)
                   else tuple(self.kernel_size))
    strides = 1 if self.strides is None else self.strides
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    def dilated(d):
      return d not in (None, 1) and tuple(d) != (1,) * len(kernel_size)
    unsupported = [rule for rule, broken in (
        ('2-D kernels on NHWC inputs', len(kernel_size) != 2 or inputs.ndim != 4),
        ('feature_group_count 1', self.feature_group_count != 1),
        ('no mask', self.mask is not None),
        ('input_dilation 1', dilated(self.input_dilation)),
        ('kernel_dilation 1', dilated(self.kernel_dilation))) if broken]
    if unsupported:
      raise ValueError(f"jaxprune's Conv supports only {', '.join(unsupported)}; use nn.Conv "
                       "for other configurations.")

    pads = _pads(inputs.shape[1:3], kernel_size, strides, self.padding)
    # The same param calls, in the same order, as nn.Conv: identical names, shapes and init.
    kernel = self.param('kernel', self.kernel_init,
                        kernel_size + (inputs.shape[-1], self.features), self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    out_spatial = [(size + lo + hi - k) // s + 1
                   for size, (lo, hi), k, s in zip(inputs.shape[1:3], pads, kernel_size, strides)]
    formulation = FORMULATIONS[choose_impl(self.impl, out_spatial)]
    if self.impl == 'auto' and jax.default_backend() == 'cpu':
      inputs = materialize(inputs, kernel)
      if formulation is conv_native:
        formulation = conv_canonical
    y = formulation(inputs, kernel, strides, pads, self.precision)
    return y if bias is None else y + bias
