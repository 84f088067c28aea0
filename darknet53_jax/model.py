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

from darknet53_jax import conv as conv_lib

STAGE_WIDTHS = (64, 128, 256, 512, 1024)
STAGE_DEPTHS = (1, 2, 8, 8, 4)
STEM_WIDTH = 32
HEAD = 'head'  # The classifier's module name; every other module is backbone.
ACTIVATIONS = ('leaky_relu', 'relu')


def uses_cpu_convs(cpu_matmul_convs: bool | None) -> bool:
  """Whether convolutions are ``conv``'s CPU ones; ``None``: only when JAX
  runs on CPUs, so GPU and TPU models are plain XLA convolutions."""
  if cpu_matmul_convs is None:
    return jax.default_backend() == 'cpu'
  return cpu_matmul_convs


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
  cpu_matmul_convs: bool | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    pad = self.kernel_size // 2
    conv_general_dilated = (conv_lib.conv_general_dilated
                            if uses_cpu_convs(self.cpu_matmul_convs)
                            else lax.conv_general_dilated)
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
    cpu_matmul_convs: compute 1x1 convolutions as matmuls, the wider 3x3
      stride-1 ones with Winograd's algorithm and the other conv kernel
      gradients as patch matmuls (faster on CPUs; see ``conv``). ``None``
      (the default): on when JAX runs on CPUs, off on GPUs and TPUs. They
      are ``custom_vjp`` functions, so forward-mode autodiff (``jax.jvp``)
      needs ``False``. XLA:CPU splits matmuls by the number of devices in
      the process, so their rounding differs between, say, 2 and 4 local
      devices; ``False`` keeps XLA's convolutions, whose results do not
      depend on it.
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
  cpu_matmul_convs: bool | None = None

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
        bn_epsilon=self.bn_epsilon, bn_axis_name=self.bn_axis_name,
        cpu_matmul_convs=self.cpu_matmul_convs)

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
    x = nn.Dense(self.num_classes, dtype=self.dtype, name=HEAD)(x)
    return jnp.asarray(x, jnp.float32)
