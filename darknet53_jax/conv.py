"""Convolutions for ``nn.Conv`` that run faster on XLA:CPU.

Values and gradients equal ``lax.conv_general_dilated``'s up to rounding
(relative differences of about 1e-6). ``conv_general_dilated`` is portable:
behind ``lax.platform_dependent``, XLA's own on other platforms (a program
lowered for several, as an export is); ``cpu_conv_general_dilated`` is for
programs that run on CPUs only, and traces without the other platforms'
branches. On CPUs (measured in docs/performance.md):

- kernel taps that read only padding are dropped (a 3x3 kernel on a 1x1
  map, or at stride 2 on a 2x2 one: the last stages at small image sizes),
  which XLA's convolution computes slowly on zeros;
- a 1x1 convolution is the matmul it is, forward and backward, and so is
  one whose single window covers the whole unpadded map;
- a float32 3x3 stride-1 convolution with at least
  ``WINOGRAD_MIN_FEATURES`` input and output features runs as Winograd's
  F(2x2, 3x3): 16 batched matmuls with 2.25 times fewer multiplications
  than the direct convolution. Its input gradient is the same algorithm on
  the transposed kernel, its kernel gradient the transpose of the batched
  matmuls;
- any other convolution's kernel gradient is the transpose of one matmul of
  image patches (im2col), where XLA emits a slow convolution over the whole
  feature map;
- with the ``onednn`` extra installed, a bfloat16 convolution and its
  gradients are oneDNN's primitives (``onednn.py``), which use AMX where
  the CPU has it; ``cpu_conv_general_dilated`` only, as exports run
  without the handlers.

XLA:CPU compiles each loop it cannot fuse into a kernel of its own, and
compiling them is most of a train step's compile time: the patches and
Winograd's tiles are one gather each, and each 1-D transform one stacked
array, rather than a slice or an array per window position.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from darknet53_jax import onednn

# What ``nn.Conv`` passes for NHWC inputs and HWIO kernels.
NHWC_HWIO = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))

# Narrower 3x3 convolutions stay XLA's: their batched matmuls are too thin
# to make up for the transforms (docs/performance.md, Winograd section).
WINOGRAD_MIN_FEATURES = 64

# Winograd F(2x2, 3x3) (Lavin and Gray, 2016). Its kernel transform G, as
# one matrix on a flattened 3x3 kernel; the input transform B^T and output
# transform A^T are the functions below, applied along height, then width.
_WINOGRAD_KERNEL_TRANSFORM = np.kron(
    *[np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]],
               np.float32)] * 2)  # (16, 9): G (x) G on a flattened 3x3 tap.


def _winograd_input_transform(s0, s1, s2, s3):
  return s0 - s2, s1 + s2, s2 - s1, s1 - s3


def _winograd_output_transform(m0, m1, m2, m3):
  return m0 + m1 + m2, m1 - m2 - m3


def _winograd_output_transform_transposed(y0, y1):
  return y0, y0 + y1, y0 - y1, -y1


def _tile_counts(height, width):
  return -(-height // 2), -(-width // 2)


def _along(transform, values, axis):
  """The 1-D ``transform`` of ``values`` along ``axis``.

  Its outputs are stacked into one array, which XLA:CPU fuses into one
  loop.
  """
  return jnp.stack(transform(*[
      lax.index_in_dim(values, i, axis, keepdims=False)
      for i in range(values.shape[axis])]), axis=axis)


def _windows(x, size, strides, counts):
  """NHWC ``x``'s windows: [batch, rows, cols, size[0], size[1], features].

  Window (r, c) starts at row ``strides[0] * r`` and column
  ``strides[1] * c``; ``counts`` are (rows, cols). One gather, which XLA:CPU
  fuses with the pad before it and the transposes after it into one loop.
  """
  rows, cols = (stride * np.arange(count)[:, None] + np.arange(window)
                for window, stride, count in zip(size, strides, counts))
  indices = np.stack(np.broadcast_arrays(rows[:, None, :, None],
                                         cols[None, :, None, :]), axis=-1)
  return lax.gather(
      x, indices.astype(np.int32), lax.GatherDimensionNumbers(
          offset_dims=(0, 5), collapsed_slice_dims=(1, 2),
          start_index_map=(1, 2)),
      slice_sizes=(x.shape[0], 1, 1, x.shape[3]), mode='promise_in_bounds')


def _winograd_tiles(x):
  """The input transform: [16, tiles, features] from NHWC ``x``.

  Tile (r, c) is the 4x4 window at (2r - 1, 2c - 1) of ``x`` padded by one
  (and by one more at the bottom and right where a side is odd).
  """
  _, height, width, features = x.shape
  x = jnp.pad(x, ((0, 0), (1, 1 + height % 2), (1, 1 + width % 2), (0, 0)))
  windows = _windows(x, (4, 4), (2, 2), _tile_counts(height, width))
  windows = windows.transpose(3, 4, 0, 1, 2, 5)
  for axis in (0, 1):
    windows = _along(_winograd_input_transform, windows, axis)
  return windows.reshape(16, -1, features)


def _winograd_products(tiles, kernel, transposed=False):
  """Transformed input tiles times the transformed kernel taps, per tap."""
  transform = _WINOGRAD_KERNEL_TRANSFORM[:, ::-1 if transposed else 1]
  taps = (transform.astype(kernel.dtype) @ kernel.reshape(9, -1)).reshape(
      16, *kernel.shape[2:])
  return lax.dot_general(tiles, taps, (((2,), (2 if transposed else 1,)),
                                       ((0,), (0,))))


def _winograd_conv(x, kernel, transposed=False):
  """A 3x3 stride-1 'SAME' NHWC/HWIO convolution, Winograd F(2x2, 3x3).

  Each 2x2 output tile comes from a 4x4 input tile: the 16 transformed
  input values of every tile multiply the 16 transformed kernel taps in one
  batched matmul over (tile, input feature), and the output transform sums
  them back into the tile. Odd heights and widths are padded by one and
  cropped. ``transposed`` convolves with the kernel flipped and its features
  swapped (the input gradient) without copying it.
  """
  batch, height, width, _ = x.shape
  tile_rows, tile_cols = _tile_counts(height, width)
  y = _winograd_products(_winograd_tiles(x), kernel, transposed).reshape(
      4, 4, batch, tile_rows, tile_cols, -1)
  for axis in (0, 1):
    y = _along(_winograd_output_transform, y, axis)
  y = y.transpose(2, 3, 0, 4, 1, 5)
  return y.reshape(batch, 2 * tile_rows, 2 * tile_cols, -1)[
      :, :height, :width]


def _input_gradient(conv, x, kernel, dy):
  return jax.vjp(lambda x: conv(x, kernel), x)[1](dy)[0]


def _kernel_gradient(conv, x, kernel, dy):
  return jax.vjp(lambda k: conv(x, k), kernel)[1](dy)[0]


def _winograd_kernel_gradient(x, kernel, dy):
  """The kernel gradient of ``_winograd_conv(x, kernel)`` for output grad dy.

  The transposed output transform of ``dy``'s 2x2 tiles, written out, then
  the transpose of ``_winograd_products`` in the kernel (one batched matmul
  with the input tiles, the transposed kernel transform). Differentiating
  ``_winograd_conv`` instead would transpose its output transform into pads.
  The input tiles are recomputed from ``x`` (a few additions) rather than
  kept from the forward pass, which would hold 4x the input per layer.
  """
  batch, height, width, out_features = dy.shape
  tile_rows, tile_cols = _tile_counts(height, width)
  dy = jnp.pad(dy, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
  tile_grads = dy.reshape(batch, tile_rows, 2, tile_cols, 2,
                          out_features).transpose(2, 4, 0, 1, 3, 5)
  for axis in (0, 1):
    tile_grads = _along(_winograd_output_transform_transposed, tile_grads,
                        axis)
  tiles = _winograd_tiles(x)
  return _kernel_gradient(_winograd_products, tiles, kernel,
                          tile_grads.reshape(16, -1, out_features))


def _uses_winograd(x, kernel, strides, padding):
  """Float32 only: in 16 bits its transforms' sums would round each time."""
  height, width, in_features, out_features = kernel.shape
  return (x.dtype == kernel.dtype == jnp.float32 and
          (height, width) == (3, 3) and strides == (1, 1) and
          padding == ((1, 1), (1, 1)) and
          min(in_features, out_features) >= WINOGRAD_MIN_FEATURES)


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
  patches = _windows(x, (height, width), strides, (rows, cols)).reshape(
      x.shape[0], rows, cols, -1)
  return patches @ kernel.reshape(height * width * in_features, out_features)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, padding, dimension_numbers):
  """The convolution and its gradients on CPUs, as the module says."""
  if _uses_winograd(x, kernel, strides, padding):
    return _winograd_conv(x, kernel)
  return _lax_conv(x, kernel, strides, padding, dimension_numbers)


def _conv_forward(x, kernel, strides, padding, dimension_numbers):
  y = _conv(x, kernel, strides, padding, dimension_numbers)
  return y, (x, kernel)


def _conv_backward(strides, padding, dimension_numbers, residuals, dy):
  x, kernel = residuals
  if _uses_winograd(x, kernel, strides, padding):
    # A stride-1 'SAME' 3x3 convolution's input gradient is the same
    # convolution of dy with the kernel flipped and its features swapped.
    return (_winograd_conv(dy, kernel, transposed=True),
            _winograd_kernel_gradient(x, kernel, dy))
  lax_conv = functools.partial(_lax_conv, strides=strides, padding=padding,
                               dimension_numbers=dimension_numbers)
  im2col_conv = functools.partial(_im2col_conv, strides=strides,
                                  padding=padding)
  return (_input_gradient(lax_conv, x, kernel, dy),
          _kernel_gradient(im2col_conv, x, kernel, dy))


_conv.defvjp(_conv_forward, _conv_backward)


def _pointwise_matmul(x, kernel):
  return lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


def _without_unread_taps(x, kernel, strides, padding):
  """``(kernel, padding)`` for the same windows of NHWC ``x``, without the
  kernel taps that read only padding (a 3x3 kernel on a 1x1 map, or at
  stride 2 on a 2x2 one): they multiply zeros."""
  new_padding = []
  for axis, (stride, (low, high)) in enumerate(zip(strides, padding)):
    size, taps = x.shape[1 + axis], kernel.shape[axis]
    outputs = (size + low + high - taps) // stride + 1
    read = [tap for tap in range(taps) if any(
        0 <= stride * i + tap - low < size for i in range(outputs))]
    if not read or (read[0], read[-1]) == (0, taps - 1):
      new_padding.append((low, high))
      continue
    first, last = read[0], read[-1]
    kernel = lax.slice_in_dim(kernel, first, last + 1, axis=axis)
    low -= first
    # Only as much high padding as the last window reaches.
    high = max(0, stride * (outputs - 1) + last + 1 - first - low - size)
    new_padding.append((low, high))
  return kernel, tuple(new_padding)


def _dense_matmul(x, kernel):
  """A convolution whose one window is all of ``x``: one matmul."""
  y = x.reshape(x.shape[0], -1) @ kernel.reshape(-1, kernel.shape[-1])
  return y.reshape(x.shape[0], 1, 1, -1)


def _cpu_conv(x, kernel, strides, padding, dimension_numbers, with_onednn):
  """The convolution on CPUs: oneDNN's, a matmul, or else ``_conv``'s.

  bfloat16 convolutions are oneDNN's where it is installed (float32 ones
  gain nothing from it: docs/performance.md). On the small maps of the last stages (at the quick start's 32 px: 1x1 and
  2x2), the taps that read only padding go first; a 1x1 kernel is then a
  matmul per position, and a window over the whole unpadded map one matmul.
  """
  kernel, padding = _without_unread_taps(x, kernel, strides, padding)
  if with_onednn and x.dtype == jnp.bfloat16 and onednn.takes(x, kernel):
    return onednn.conv(x, kernel, strides, padding)
  unpadded = padding == ((0, 0), (0, 0))
  if unpadded and kernel.shape[:2] == x.shape[1:3]:
    return _dense_matmul(x, kernel)
  if unpadded and kernel.shape[:2] == (1, 1) and strides == (1, 1):
    return _pointwise_matmul(x, kernel)
  return _conv(x, kernel, strides, padding, dimension_numbers)


def _conv_general_dilated(x, kernel, strides, padding, lhs_dilation,
                          rhs_dilation, dimension_numbers,
                          feature_group_count, precision, *, portable):
  """``lax.conv_general_dilated`` for ``nn.Conv``, faster on CPUs.

  The same values and gradients (up to rounding); supports what ``ConvBN``
  uses: NHWC inputs, HWIO kernels, no dilation, one feature group, default
  precision.
  """
  if (dimension_numbers != NHWC_HWIO or
      set(lhs_dilation) | set(rhs_dilation) != {1} or
      feature_group_count != 1 or precision is not None):
    raise NotImplementedError('Only undilated, ungrouped NHWC/HWIO '
                              'convolutions at the default precision.')
  strides, padding = tuple(strides), tuple(map(tuple, padding))
  lax_conv = functools.partial(_lax_conv, strides=strides, padding=padding,
                               dimension_numbers=dimension_numbers)
  cpu_conv = functools.partial(_cpu_conv, strides=strides, padding=padding,
                               dimension_numbers=dimension_numbers,
                               with_onednn=not portable)
  if not portable:
    return cpu_conv(x, kernel)
  return lax.platform_dependent(x, kernel, cpu=cpu_conv, default=lax_conv)


conv_general_dilated = functools.partial(_conv_general_dilated, portable=True)
cpu_conv_general_dilated = functools.partial(_conv_general_dilated,
                                             portable=False)
