"""Darknet-53 (YOLOv3, Table 1) in Flax Linen.

Every convolution is bias-free, padded symmetrically by k // 2 (as Darknet,
PyTorch and timm do, so stride-2 convs see the same pixels and weights port
one to one), followed by BatchNorm and the activation. Parameters and BatchNorm
statistics are float32; the compute runs in ``dtype``.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

STAGE_WIDTHS = (64, 128, 256, 512, 1024)
STAGE_DEPTHS = (1, 2, 8, 8, 4)
STEM_WIDTH = 32
ACTIVATIONS = ('leaky_relu', 'relu')


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


class ConvBN(nn.Module):
  """Bias-free conv, symmetric k // 2 padding, BatchNorm, activation."""
  features: int
  kernel_size: int
  strides: int = 1
  activation: Any = nn.relu
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    pad = self.kernel_size // 2
    x = nn.Conv(
        self.features, (self.kernel_size, self.kernel_size),
        strides=self.strides, padding=((pad, pad), (pad, pad)), use_bias=False,
        dtype=self.dtype, kernel_init=nn.initializers.he_normal(),
        conv_general_dilated=conv_general_dilated, name='conv')(x)
    x = nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum,
        epsilon=self.bn_epsilon, dtype=self.dtype,
        axis_name=self.bn_axis_name if train else None, name='bn')(x)
    return self.activation(x)


class DarkBlock(nn.Module):
  """Residual block: 1x1 conv to C/2, 3x3 conv to C, add the input."""
  conv: Any

  @nn.compact
  def __call__(self, x, train: bool):
    channels = x.shape[-1]
    y = self.conv(channels // 2, 1, name='conv1')(x, train)
    y = self.conv(channels, 3, name='conv2')(y, train)
    return x + y


class Darknet53(nn.Module):
  """Darknet-53 classifier and YOLOv3 backbone.

  Attributes:
    num_classes: classifier outputs.
    activation: 'leaky_relu' (Darknet, timm) or 'relu' (the MindSpore port).
    negative_slope: leaky ReLU slope: 0.1 as in Darknet, 0.01 as in timm.
    width_multiplier: scales every channel count (1.0 is the paper's net).
    stage_depths: residual blocks per stage (the paper: 1, 2, 8, 8, 4).
    dtype: compute dtype; parameters and BatchNorm statistics stay float32.
    bn_momentum: weight of the old running statistic (Flax convention).
    bn_epsilon: BatchNorm epsilon.
    bn_axis_name: mesh axis to synchronise BatchNorm batch statistics over
      in training (``None``: per-device statistics).
  """
  num_classes: int = 1000
  activation: str = 'leaky_relu'
  negative_slope: float = 0.1
  width_multiplier: float = 1.0
  stage_depths: Sequence[int] = STAGE_DEPTHS
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_axis_name: str | None = None

  def _width(self, channels: int) -> int:
    return max(1, int(round(channels * self.width_multiplier)))

  @nn.compact
  def __call__(self, images, train: bool = False, features_only: bool = False):
    """Runs the network on NHWC images whose sides are multiples of 32.

    Args:
      images: float array [batch, height, width, channels].
      train: use batch statistics and update the running ones.
      features_only: return the stride-8, 16 and 32 feature maps (the three
        inputs of a YOLOv3 head) instead of the logits.

    Returns:
      float32 logits [batch, num_classes], or a tuple of three feature maps.
    """
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'Unknown activation {self.activation!r}; use one of '
                       f'{ACTIVATIONS}.')
    if len(self.stage_depths) != len(STAGE_WIDTHS):
      raise ValueError(f'stage_depths needs {len(STAGE_WIDTHS)} entries, got '
                       f'{tuple(self.stage_depths)}.')
    act = (functools.partial(nn.leaky_relu, negative_slope=self.negative_slope)
           if self.activation == 'leaky_relu' else nn.relu)
    conv = functools.partial(
        ConvBN, activation=act, dtype=self.dtype, bn_momentum=self.bn_momentum,
        bn_epsilon=self.bn_epsilon, bn_axis_name=self.bn_axis_name)

    x = jnp.asarray(images, self.dtype)
    x = conv(self._width(STEM_WIDTH), 3, name='stem')(x, train)
    features = []
    for s, (width, depth) in enumerate(zip(STAGE_WIDTHS, self.stage_depths)):
      x = conv(self._width(width), 3, strides=2,
               name=f'stage{s}_down')(x, train)
      for b in range(depth):
        x = DarkBlock(conv, name=f'stage{s}_block{b}')(x, train)
      features.append(x)
    if features_only:
      return tuple(features[-3:])
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return jnp.asarray(x, jnp.float32)
