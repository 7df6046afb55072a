"""A 2-D convolution with nn.Conv's parameters, computed the fastest way measured on CPU.

XLA's CPU backend runs `lax.conv_general_dilated` at a small fraction of its usual speed
when the output map is tiny, so the last stage of a CIFAR VGG dominated its train step.
Written as patches x matrix (im2col: the kh*kw shifted, strided views of the zero-padded
input concatenated along channels, times the kernel reshaped to (kh*kw*C_in, C_out)) the
same convolution is one matmul, and its gradients are a matmul plus pads, which XLA runs
at full speed there. The measurements behind every choice below are in
experiments/bench/README.md (section 1).

`Conv` is an `nn.Conv` subclass (so `isinstance(m, nn.Conv)` holds and MAC counting sees it)
that creates exactly nn.Conv's parameters: `kernel` (kh, kw, C_in, C_out) HWIO with the
module's `kernel_init`, and `bias` (C_out,) only with `use_bias`. Swapping one for the other
changes no parameter path, shape or initial value, so structure derivation, shrinking and
checkpoints do not notice. Only NHWC inputs, feature_group_count 1, no dilation and no mask
are supported (what jaxprune's models use); padding is 'SAME', 'VALID' or explicit pairs.

Which formulation runs is the module's `impl`, a key of
`jaxprune.kernels.options.CONV_IMPLS` (models pass their `performance.conv_impl`):
  native   `lax.conv_general_dilated` (what nn.Conv does).
  patches  im2col + one matmul: the same convolution, same padding and strides; float32
           results agree to rounding, forward and gradients.
  auto     on the CPU backend, `choose_impl`'s rule: 'patches' when the output map has at
           most PATCHES_MAX_OUTPUT_PIXELS positions (H_out * W_out), else 'native'; and
           the input is passed through `materialize` (below). Those tiny maps are where
           native is many times slower in the forward pass and the input gradient; from
           the next size up native is the faster choice in every pass a layer needs. The
           rule was measured under the compiler options of `jaxprune.kernels.compiler`,
           which make native's kernel gradient much faster than XLA's default CPU options
           do. Off the CPU 'auto' is plain 'native' (cuDNN and the TPU compiler have no
           such cliff that we know of).

On the CPU, 'auto' also computes the native convolution's gradients itself
(`conv_canonical`, a `jax.custom_vjp`): both backward convolutions are written in the
forward pass's NHWC x HWIO -> NHWC layout (input gradient: the cotangent, dilated by the
strides, convolved with the spatially flipped kernel whose in and out axes are swapped;
kernel gradient: the input as (C, H, W, N) convolved with the cotangent as (H, W, N, O),
dilated by the strides, transposed back). XLA:CPU rewrites JAX's own backward
convolutions (`b01f_01oi->b01f`, `f01b_i01o->01bf`) into that layout only in the entry
computation; inside a loop body (`steps_per_call` > 1) they stayed generic loop-emitted
convolutions, tens of times slower (experiments/bench/README.md, section 13). The gradients
are lax's bit for bit (tests/test_conv.py).

`materialize(x, kernel)` returns x / one, with `one` a runtime 1.0 derived from the kernel
(exact: x / 1 == x, and its gradient is the identity). Why: in a train step XLA's CPU
fusion recomputes a cheap elementwise producer inside every consumer instead of reading
the buffer it already wrote, and the backward pass's kernel-gradient convolution consumes
its input through a transpose. For a residual stream, x_k = relu(bn(conv(.)) + x_{k-1}),
each such transpose re-derived the whole stage's chain of blocks, and that was most of a
ResNet-56 step. A floating-point division is one of the ops XLA will not duplicate, so
the conv input is computed once, with a bitwise identical loss; a network without a
residual chain (VGG) is not slowed. 'native' and 'patches' never apply it.

The formulation is chosen while tracing, so a compiled function keeps the one it was
traced with; a model with other options is another (unequal) module and compiles anew.
"""

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxprune.kernels.options import CONV_IMPLS

# The 'auto' rule on the CPU backend (measured; see the module docstring): the largest output
# map (H_out * W_out) computed as patches.
PATCHES_MAX_OUTPUT_PIXELS = 4


def _check(impl) -> str:
  # Models pass a PerformanceOptions value, checked when it was made: anything else is a bug.
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv implementation {impl!r} is not one of {', '.join(CONV_IMPLS)}.")
  return impl


def choose_impl(impl: str, output_spatial: Sequence[int], backend: str | None = None) -> str:
  """The formulation (a key of FORMULATIONS) of one convolution: `impl`, or the rule for 'auto'.

  Args:
    impl: a key of CONV_IMPLS.
    output_spatial: the output map's spatial shape (H_out, W_out).
    backend: the JAX backend the convolution runs on (default `jax.default_backend()`).
  """
  _check(impl)
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
  """NHWC x HWIO convolution as im2col + one matmul; the same result as `conv_native`.

  The kh*kw strided views of the padded input are concatenated along channels in
  (row, column, channel) order, which is the HWIO kernel's row-major order, so the
  kernel is only reshaped, never transposed.
  """
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
  """x / one with a runtime one (from the kernel): the same values, computed once by XLA.

  See the module docstring: XLA's CPU fusion does not duplicate a floating-point
  division into its consumers, so the conv input stops being recomputed inside the
  backward pass's transposes. sign(|k| + 1) is 1 for every non-NaN k; a NaN kernel
  makes the output NaN, as the convolution would anyway.
  """
  one = lax.stop_gradient(lax.sign(lax.abs(kernel.reshape(-1)[0]) + 1))
  return x / one.astype(x.dtype)


def conv_native(x, kernel, strides, pads, precision=None):
  """NHWC x HWIO `lax.conv_general_dilated` with explicit pads (what nn.Conv computes)."""
  return lax.conv_general_dilated(x, kernel, strides, pads,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_canonical(x, kernel, strides, pads, precision=None):
  """`conv_native` whose backward convolutions are written in the forward's NHWC x HWIO ->
  NHWC layout (see the module docstring): the same gradients, which XLA's CPU backend
  runs at full speed inside a loop body too."""
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
  """nn.Conv (2-D, NHWC, no groups or dilation) computed as `choose_impl` chooses.

  Attributes (beyond nn.Conv's):
    impl: a key of CONV_IMPLS (see the module docstring).
  """
  impl: str = 'auto'

  @nn.compact
  def __call__(self, inputs):
    kernel_size = ((self.kernel_size,) * 2 if isinstance(self.kernel_size, int)
                   else tuple(self.kernel_size))
    strides = 1 if self.strides is None else self.strides
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    unsupported = []
    if len(kernel_size) != 2 or inputs.ndim != 4:
      unsupported.append('2-D kernels on NHWC inputs')
    if self.feature_group_count != 1:
      unsupported.append('feature_group_count 1')
    if self.mask is not None:
      unsupported.append('no mask')
    for field in ('input_dilation', 'kernel_dilation'):
      d = getattr(self, field)
      if d not in (None, 1) and tuple(d) != (1,) * len(kernel_size):
        unsupported.append(f'{field} 1')
    if unsupported:
      raise ValueError(f"jaxprune's Conv supports only {', '.join(unsupported)}; use nn.Conv "
                       "for other configurations.")
    impl = _check(self.impl)

    pads = _pads(inputs.shape[1:3], kernel_size, strides, self.padding)
    # The same param calls, in the same order, as nn.Conv: identical names, shapes and init.
    kernel = self.param('kernel', self.kernel_init,
                        kernel_size + (inputs.shape[-1], self.features), self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    out_spatial = [(size + lo + hi - k) // s + 1
                   for size, (lo, hi), k, s in zip(inputs.shape[1:3], pads, kernel_size, strides)]
    formulation = FORMULATIONS[choose_impl(impl, out_spatial)]
    if impl == 'auto' and jax.default_backend() == 'cpu':
      inputs = materialize(inputs, kernel)
      if formulation is conv_native:
        formulation = conv_canonical
    y = formulation(inputs, kernel, strides, pads, self.precision)
    if bias is not None:
      y = y + bias
    return y
