"""Convolutions for ``nn.Conv`` that run faster on XLA:CPU.

Values and gradients equal ``lax.conv_general_dilated``'s up to summation
order. Two things differ, and only on CPUs (measured in docs/performance.md):
XLA emits a kernel gradient as a slow convolution over the whole feature map,
while one matmul of the image patches runs 2 to 10 times faster; and a 1x1
convolution runs about twice as fast, forward and backward, as the matmul it
is.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp

# What ``nn.Conv`` passes for NHWC inputs and HWIO kernels.
NHWC_HWIO = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _lax_conv(x, kernel, strides, padding, dimension_numbers):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=dimension_numbers)


def _im2col_conv(x, kernel, strides, padding):
  """The NHWC/HWIO convolution as one matmul of image patches.

  Only its transpose in ``kernel`` is used: one matmul over batch x height x
  width of the patches (every kernel tap's shifted window, side by side),
  which XLA:CPU runs several times faster than the convolution it emits for
  a kernel gradient.
  """
  height, width, in_features, out_features = kernel.shape
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  rows = (x.shape[1] - height) // strides[0] + 1
  cols = (x.shape[2] - width) // strides[1] + 1
  patches = jnp.concatenate([
      lax.slice(x, (0, i, j, 0),
                (x.shape[0], i + (rows - 1) * strides[0] + 1,
                 j + (cols - 1) * strides[1] + 1, in_features),
                (1, *strides, 1))
      for i in range(height) for j in range(width)], axis=-1)
  return patches @ kernel.reshape(height * width * in_features, out_features)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, padding, dimension_numbers):
  return _lax_conv(x, kernel, strides, padding, dimension_numbers)


def _conv_forward(x, kernel, strides, padding, dimension_numbers):
  return _lax_conv(x, kernel, strides, padding, dimension_numbers), (x, kernel)


def _conv_backward(strides, padding, dimension_numbers, residuals, dy):
  """XLA's gradients, except the kernel's through a patch matmul on CPUs."""
  x, kernel = residuals
  lax_conv = functools.partial(_lax_conv, strides=strides, padding=padding,
                               dimension_numbers=dimension_numbers)
  dx = jax.vjp(lambda x: lax_conv(x, kernel), x)[1](dy)[0]

  def kernel_gradient(conv):
    return lambda x, dy: jax.vjp(lambda k: conv(x, k), kernel)[1](dy)[0]

  dkernel = lax.platform_dependent(
      x, dy, default=kernel_gradient(lax_conv),
      cpu=kernel_gradient(functools.partial(
          _im2col_conv, strides=strides, padding=padding)))
  return dx, dkernel


_conv.defvjp(_conv_forward, _conv_backward)


def _pointwise_matmul(x, kernel):
  return lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


def conv_general_dilated(x, kernel, strides, padding, lhs_dilation,
                         rhs_dilation, dimension_numbers, feature_group_count,
                         precision):
  """``lax.conv_general_dilated`` for ``nn.Conv``, faster on CPUs.

  The same values and gradients (up to summation order); supports what
  ``ConvBN`` uses: NHWC inputs, HWIO kernels, no dilation, one feature
  group, default precision.
  """
  if (dimension_numbers != NHWC_HWIO or
      set(lhs_dilation) | set(rhs_dilation) != {1} or
      feature_group_count != 1 or precision is not None):
    raise NotImplementedError('Only undilated, ungrouped NHWC/HWIO '
                              'convolutions at the default precision.')
  strides, padding = tuple(strides), tuple(map(tuple, padding))
  if kernel.shape[:2] == (1, 1) and strides == (1, 1) and padding == (
      (0, 0), (0, 0)):
    return lax.platform_dependent(
        x, kernel, cpu=_pointwise_matmul, default=functools.partial(
            _lax_conv, strides=strides, padding=padding,
            dimension_numbers=dimension_numbers))
  return _conv(x, kernel, strides, padding, dimension_numbers)
