"""Darknet-53 (YOLOv3, Table 1) in Flax Linen.

Every convolution is bias-free, padded symmetrically by k // 2 (as Darknet,
PyTorch and timm do, so stride-2 convs see the same pixels and weights port
one to one), followed by BatchNorm and the activation. Parameters and BatchNorm
statistics are float32; the compute runs in ``dtype``, except BatchNorm's
statistics and normalisation, which run in float32 (Flax promotes them) and
return ``dtype``.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
from flax.linen import normalization
import jax
from jax import lax
import jax.numpy as jnp

from darknet53_jax import conv as conv_lib

STAGE_WIDTHS = (64, 128, 256, 512, 1024)
STAGE_DEPTHS = (1, 2, 8, 8, 4)
STEM_WIDTH = 32
HEAD = 'head'  # The classifier's module name; every other module is backbone.
ACTIVATIONS = ('leaky_relu', 'relu')
# MindSpore's TruncatedNormal() default: sigma 0.01, cut at 2 sigma.
TRUNCATED_NORMAL_STDDEV = 0.01
# Convolution kernel initialisers. Fans count the kernel taps: Glorot's
# uniform bound is sqrt(6 / (fan_in + fan_out)), MindSpore's
# XavierUniform(gain=1).
KERNEL_INITS = {
    'he_normal': nn.initializers.he_normal(),
    'xavier_uniform': nn.initializers.xavier_uniform(),
}
# Classifier kernel initialisers: Flax's Dense default, or MindSpore's
# TruncatedNormal().
HEAD_INITS = {
    'lecun_normal': nn.initializers.lecun_normal(),
    'truncated_normal': nn.initializers.truncated_normal(
        TRUNCATED_NORMAL_STDDEV),
}


def uses_cpu_convs(cpu_matmul_convs: bool | None) -> bool:
  """Whether convolutions are ``conv``'s CPU ones; ``None``: only when JAX
  runs on CPUs, so GPU and TPU models are plain XLA convolutions."""
  if cpu_matmul_convs is None:
    return jax.default_backend() == 'cpu'
  return cpu_matmul_convs


def conv_function(cpu_matmul_convs: bool | None):
  """The convolution ``ConvBN`` runs: XLA's, or ``conv``'s CPU ones.

  ``None`` on CPUs gives the CPU ones for programs that run there only (they
  trace in less time); ``True`` the portable ones, XLA's on other platforms
  (an export lowers for several).
  """
  if not uses_cpu_convs(cpu_matmul_convs):
    return lax.conv_general_dilated
  return (conv_lib.cpu_conv_general_dilated if cpu_matmul_convs is None
          else conv_lib.conv_general_dilated)


class BatchNorm(nn.BatchNorm):
  """Flax's BatchNorm over the last axis, with a choice of running variance.

  It normalises with the biased batch variance, as Flax does. Its running
  variance moves towards that one too, or, with ``unbiased_variance``,
  towards the unbiased one, n / (n - 1) times it for n values per channel
  (counted over the ``axis_name`` devices too), as PyTorch and cuDNN (the
  MindSpore reference's GPU BatchNorm) do. Statistics and normalisation are
  Flax's own functions, so ``unbiased_variance=False`` computes exactly what
  ``nn.BatchNorm`` does.
  """
  unbiased_variance: bool = False

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    reduction_axes = tuple(range(x.ndim - 1))
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features,
                            jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features,
                           jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axis_name = None if self.is_initializing() else self.axis_name
      # On one device its statistics are the synchronised ones, exactly:
      # the all-reduces would only split XLA's fusions (compile time), so
      # only the running statistics pass through one, which types them as
      # the same on every device.
      one_device = axis_name is not None and lax.axis_size(axis_name) == 1
      mean, var = normalization._compute_stats(  # pylint: disable=protected-access
          x, reduction_axes, self.dtype, None if one_device else axis_name,
          use_fast_variance=self.use_fast_variance)
      if not self.is_initializing():
        running_var = var
        if self.unbiased_variance:
          count = x.size // x.shape[-1]
          if axis_name is not None:
            count *= lax.axis_size(axis_name)
          running_var = var * (count / (count - 1))
        running = (self.momentum * ra_mean.value + (1 - self.momentum) * mean,
                   self.momentum * ra_var.value +
                   (1 - self.momentum) * running_var)
        if one_device:
          running = lax.pmean(running, axis_name)
        ra_mean.value, ra_var.value = running
    return normalization._normalize(  # pylint: disable=protected-access
        self, x, mean, var, reduction_axes, (x.ndim - 1,), self.dtype,
        self.param_dtype, self.epsilon, self.use_bias, self.use_scale,
        self.bias_init, self.scale_init)


class ConvBN(nn.Module):
  """Bias-free conv, symmetric k // 2 padding, BatchNorm, activation."""
  features: int
  kernel_size: int
  strides: int = 1
  activation: Any = nn.relu
  dtype: Any = jnp.float32
  kernel_init: str = 'he_normal'
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_unbiased_variance: bool = False
  bn_axis_name: str | None = None
  cpu_matmul_convs: bool | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    pad = self.kernel_size // 2
    x = nn.Conv(
        self.features, (self.kernel_size, self.kernel_size),
        strides=self.strides, padding=((pad, pad), (pad, pad)), use_bias=False,
        dtype=self.dtype, kernel_init=KERNEL_INITS[self.kernel_init],
        conv_general_dilated=conv_function(self.cpu_matmul_convs),
        name='conv')(x)
    x = BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum,
        epsilon=self.bn_epsilon, dtype=self.dtype,
        unbiased_variance=self.bn_unbiased_variance,
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
    kernel_init: convolution kernel initialiser, a KERNEL_INITS name.
    head_init: classifier kernel initialiser, a HEAD_INITS name.
    bn_momentum: weight of the old running statistic (the convention of
      Flax and MindSpore; PyTorch's momentum m is 1 - m here).
    bn_epsilon: BatchNorm epsilon.
    bn_unbiased_variance: update the running variance with the unbiased
      batch variance (``BatchNorm``).
    bn_axis_name: mesh axis to synchronise BatchNorm batch statistics over
      in training (``None``: per-device statistics).
    cpu_matmul_convs: compute 1x1 convolutions as matmuls, the wider 3x3
      stride-1 ones with Winograd's algorithm and the other conv kernel
      gradients as patch matmuls (faster on CPUs; see ``conv``). ``None``
      (the default): on when JAX runs on CPUs, for programs that run there
      only; off on GPUs and TPUs. ``True``: on CPUs, and XLA's convolutions
      where a program runs elsewhere (``conv_function``). They
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
  kernel_init: str = 'he_normal'
  head_init: str = 'lecun_normal'
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_unbiased_variance: bool = False
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
      float32 logits [batch, num_classes] (float64 for a float64 ``dtype``),
      or a tuple of three feature maps.
    """
    for field, choices in (('activation', ACTIVATIONS),
                           ('kernel_init', KERNEL_INITS),
                           ('head_init', HEAD_INITS)):
      if getattr(self, field) not in choices:
        raise ValueError(f'Unknown {field} {getattr(self, field)!r}; use one '
                         f'of {tuple(choices)}.')
    if len(self.stage_depths) != len(STAGE_WIDTHS):
      raise ValueError(f'stage_depths needs {len(STAGE_WIDTHS)} entries, got '
                       f'{tuple(self.stage_depths)}.')
    act = (functools.partial(nn.leaky_relu, negative_slope=self.negative_slope)
           if self.activation == 'leaky_relu' else nn.relu)
    conv = functools.partial(
        ConvBN, activation=act, dtype=self.dtype, kernel_init=self.kernel_init,
        bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
        bn_unbiased_variance=self.bn_unbiased_variance,
        bn_axis_name=self.bn_axis_name, cpu_matmul_convs=self.cpu_matmul_convs)

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
    x = nn.Dense(self.num_classes, dtype=self.dtype,
                 kernel_init=HEAD_INITS[self.head_init], name=HEAD)(x)
    return jnp.asarray(x, jnp.promote_types(self.dtype, jnp.float32))
