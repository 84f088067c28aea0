"""Convolutions for ``nn.Conv`` that train faster on XLA:CPU.

Values and gradients equal ``lax.conv_general_dilated``'s up to summation
order. Only the kernel gradient differs, and only on CPUs: there XLA emits it
as a slow convolution over the whole feature map, while one matmul per kernel
tap runs about three times faster (measured in docs/performance.md).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp


def _lax_conv(x, kernel, strides, padding, dimension_numbers):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=dimension_numbers)


def _tap_matmul_conv(x, kernel, strides, padding):
  """The NHWC/HWIO convolution as a sum of one matmul per kernel tap.

  Only its transpose in ``kernel`` is used: a matmul over batch x height x
  width per tap, which XLA:CPU runs about three times faster than the
  convolution it emits for a kernel gradient.
  """
  height, width, in_features, _ = kernel.shape
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  rows = (x.shape[1] - height) // strides[0] + 1
  cols = (x.shape[2] - width) // strides[1] + 1
  taps = jnp.split(kernel.reshape(height * width, in_features, -1),
                   height * width)
  y = 0
  for t, tap in enumerate(taps):
    i, j = divmod(t, width)
    window = lax.slice(
        x, (0, i, j, 0),
        (x.shape[0], i + (rows - 1) * strides[0] + 1,
         j + (cols - 1) * strides[1] + 1, in_features), (1, *strides, 1))
    y = y + window @ tap[0]
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, padding, dimension_numbers):
  return _lax_conv(x, kernel, strides, padding, dimension_numbers)


def _conv_forward(x, kernel, strides, padding, dimension_numbers):
  return _lax_conv(x, kernel, strides, padding, dimension_numbers), (x, kernel)


def _conv_backward(strides, padding, dimension_numbers, residuals, dy):
  """XLA's gradients, except the kernel's through tap matmuls on CPUs."""
  x, kernel = residuals
  lax_conv = functools.partial(_lax_conv, strides=strides, padding=padding,
                               dimension_numbers=dimension_numbers)
  dx = jax.vjp(lambda x: lax_conv(x, kernel), x)[1](dy)[0]

  def kernel_gradient(conv):
    return lambda x, dy: jax.vjp(lambda k: conv(x, k), kernel)[1](dy)[0]

  dkernel = lax.platform_dependent(
      x, dy, default=kernel_gradient(lax_conv),
      cpu=kernel_gradient(functools.partial(
          _tap_matmul_conv, strides=strides, padding=padding)))
  return dx, dkernel


_conv.defvjp(_conv_forward, _conv_backward)


def conv_general_dilated(x, kernel, strides, padding, lhs_dilation,
                         rhs_dilation, dimension_numbers, feature_group_count,
                         precision):
  """``lax.conv_general_dilated`` for ``nn.Conv``, faster to train on CPUs.

  The same values and gradients (up to summation order); supports what
  ``ConvBN`` uses: no dilation, one feature group, default precision.
  """
  if (set(lhs_dilation) | set(rhs_dilation) != {1} or feature_group_count != 1
      or precision is not None):
    raise NotImplementedError('Only undilated, ungrouped convolutions at '
                              'the default precision.')
  return _conv(x, kernel, tuple(strides), tuple(map(tuple, padding)),
               dimension_numbers)
