"""The CPU convolutions equal XLA's, values and gradients.

Every result is compared with XLA's convolution computed in float64 on the
same float32 inputs: a reference that float32 rounding, which differs between
CPU families (AVX2 and AVX-512 kernels sum in other orders), cannot move.
The tolerances are multiples of the float32 error measured against it.
"""

import functools

import jax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from darknet53_jax import conv
from darknet53_jax import model as model_lib
from tests import conftest


# Ours in float32 measured within 4.1e-7 of the float64 reference in every
# case here (AMD EPYC, AVX2), relative to the largest value: the tolerance is
# about 5 times that (17 float32 ulps), and an error in any tap or tile
# would be O(1).
CONV_TOLERANCE = 2e-6


def _relative_difference(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _in_float64(fn, *args):
  """``fn`` jitted on float64 copies of ``args``, as NumPy arrays."""
  with jax.enable_x64(True):
    return jax.device_get(jax.jit(fn)(*[
        jnp.asarray(a, jnp.float64) for a in args]))


def _normal(rng, *shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _apply(conv_fn, x, kernel, strides):
  """``conv_fn`` as ``nn.Conv`` calls it, 'SAME'-padded by size // 2."""
  pad = kernel.shape[0] // 2
  return conv_fn(x, kernel, (strides, strides), ((pad, pad), (pad, pad)),
                 (1, 1), (1, 1), conv.NHWC_HWIO, 1, precision=None)


# (kernel size, stride, side, features): the 1x1 matmul, the im2col kernel
# gradient (3x3 at either stride, narrow), Winograd (3x3 stride 1, at least
# WINOGRAD_MIN_FEATURES wide; odd and even sides) and the maps where taps
# read only padding (1x1 at either stride; 2x2 at stride 2).
CASES = [(1, 1, 12, 6), (3, 1, 12, 6), (3, 2, 12, 6),
         (3, 1, 4, conv.WINOGRAD_MIN_FEATURES),
         (3, 1, 5, conv.WINOGRAD_MIN_FEATURES),
         (3, 1, 1, conv.WINOGRAD_MIN_FEATURES), (3, 2, 1, 6), (3, 2, 2, 6),
         (3, 2, 7, 6)]


@pytest.mark.parametrize('conv_fn', [conv.conv_general_dilated,
                                     conv.cpu_conv_general_dilated],
                         ids=['portable', 'cpu_only'])
@pytest.mark.parametrize('size, strides, side, features', CASES)
def test_values_and_gradients_equal_xla(size, strides, side, features,
                                        conv_fn):
  rng = np.random.default_rng(size + strides + side)
  x = _normal(rng, 3, side, side, features)
  kernel = _normal(rng, size, size, features, features + 1)

  side_out = -(-side // strides)
  dy = _normal(np.random.default_rng(0), 3, side_out, side_out, features + 1)

  def value_and_gradients(conv_fn, x, kernel, dy):
    y, vjp = jax.vjp(
        lambda x, kernel: _apply(conv_fn, x, kernel, strides), x, kernel)
    return (y, *vjp(dy))

  ours = jax.jit(functools.partial(value_and_gradients, conv_fn))(
      x, kernel, dy)
  reference = _in_float64(functools.partial(
      value_and_gradients, lax.conv_general_dilated), x, kernel, dy)
  for name, a, b in zip(('output', 'input gradient', 'kernel gradient'),
                        ours, reference):
    assert a.shape == b.shape, name
    assert _relative_difference(a, b) < CONV_TOLERANCE, name


@pytest.mark.parametrize('size, strides, side, features', CASES)
def test_gradients_of_a_replicated_kernel_under_shard_map(size, strides, side,
                                                           features):
  """As in the train step: the batch is split over devices, the kernel not."""
  rng = np.random.default_rng(size + strides + side)
  x = _normal(rng, jax.device_count() * 2, side, side, features)
  kernel = _normal(rng, size, size, features, features + 1)
  dy = _normal(rng, x.shape[0], -(-side // strides), -(-side // strides),
               features + 1)
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  specs = (P('data'), P(), P('data'))

  def gradients(conv_fn):
    def local(x, kernel, dy):
      def loss(x, kernel):
        y = _apply(conv_fn, x, kernel, strides)
        return lax.pmean(jnp.sum(y * dy), 'data')
      return jax.grad(loss, argnums=(0, 1))(x, kernel)
    sharded = [jax.device_put(a, NamedSharding(mesh, spec))
               for a, spec in zip((x, kernel, dy), specs)]
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs,
                                 out_specs=specs[:2]))(*sharded)

  def full_batch_gradients(x, kernel, dy):
    loss = lambda x, kernel: jnp.sum(
        _apply(lax.conv_general_dilated, x, kernel, strides) * dy) / (
            jax.device_count())
    return jax.grad(loss, argnums=(0, 1))(x, kernel)

  reference = _in_float64(full_batch_gradients, x, kernel, dy)
  for name, a, b in zip(('input gradient', 'kernel gradient'),
                        gradients(conv.conv_general_dilated), reference):
    assert _relative_difference(a, b) < CONV_TOLERANCE, name


@pytest.mark.parametrize('side', [4, 7])
def test_winograd_and_its_transpose_equal_xla(side):
  rng = np.random.default_rng(side)
  x = _normal(rng, 2, side, side, 8)
  kernel = _normal(rng, 3, 3, 8, 5)
  xla = lambda x, k: lax.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv.NHWC_HWIO)
  winograd = jax.jit(conv._winograd_conv, static_argnames='transposed')
  assert _relative_difference(winograd(x, kernel),
                              _in_float64(xla, x, kernel)) < CONV_TOLERANCE
  dy = _normal(rng, 2, side, side, 5)
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  assert _relative_difference(
      winograd(dy, kernel, transposed=True),
      _in_float64(xla, dy, flipped)) < CONV_TOLERANCE


def test_winograd_is_used_for_wide_float32_3x3_stride_1_only():
  wide = conv.WINOGRAD_MIN_FEATURES
  same = ((1, 1), (1, 1))
  x = jnp.zeros((1, 4, 4, wide))
  uses = lambda x, shape, strides=(1, 1), padding=same: conv._uses_winograd(
      x, jnp.zeros(shape, x.dtype), strides, padding)
  assert uses(x, (3, 3, wide, wide))
  assert not uses(x.astype(jnp.bfloat16), (3, 3, wide, wide))
  assert not uses(x[..., 1:], (3, 3, wide - 1, wide))
  assert not uses(x, (3, 3, wide, wide), strides=(2, 2))
  assert not uses(x, (1, 1, wide, wide), padding=((0, 0),) * 2)


@pytest.mark.parametrize('side, strides, kept_taps', [
    (1, 1, 1), (1, 2, 1), (2, 2, 2), (2, 1, 3), (3, 2, 3), (4, 2, 3)])
def test_taps_that_read_only_padding_are_dropped(side, strides, kept_taps):
  x = jnp.zeros((2, side, side, 4))
  kernel, padding = conv._without_unread_taps(
      x, jnp.zeros((3, 3, 4, 5)), (strides, strides), ((1, 1), (1, 1)))
  assert kernel.shape == (kept_taps, kept_taps, 4, 5)
  # The same windows: as many outputs as the 3x3 'SAME' convolution gives.
  assert lax.conv_general_dilated(
      x, kernel, (strides, strides), padding,
      dimension_numbers=conv.NHWC_HWIO).shape[1] == -(-side // strides)


@pytest.mark.parametrize('side, strides', [(1, 1), (2, 2)])
def test_a_window_over_the_whole_map_is_one_matmul(side, strides):
  x = jnp.zeros((2, side, side, 4))
  kernel = jnp.zeros((3, 3, 4, 5))
  program = jax.make_jaxpr(lambda x, kernel: _apply(
      conv.cpu_conv_general_dilated, x, kernel, strides))(x, kernel)
  primitives = {e.primitive.name for e in program.jaxpr.eqns}
  assert 'dot_general' in primitives
  assert 'conv_general_dilated' not in primitives


def test_darknet53_logits_and_gradients_equal_xla_convolutions():
  """The whole network in train mode, Winograd in its two widest stages.

  BatchNorm amplifies rounding where it normalises few values: at 2x2 final
  maps and 4 images, float32 (ours and XLA's alike) was 4e-2 away from
  float64 in early-layer gradients. At 128 px (4x4 final maps) and 8 images
  both float32 paths were within 6e-6 of it on an AMD EPYC (AVX2). On an
  Intel Xeon (AVX-512) ours was 3.6e-3 away in stages 0-1 (XLA's 6.7e-6):
  its other rounding put one pre-activation (of 262,144 after stage 1's
  3x3 convolution; counted) on the other side of a leaky ReLU's kink,
  whose slope then differs by 0.9 there, and BatchNorm's backward spreads
  that over every channel (with ReLU, at 64 px, or with 4 images, ours was
  within 8.4e-6). The gradient tolerance allows one such flip; a wrong
  convolution moves results by O(1).
  """
  images = _normal(np.random.default_rng(1), 8, 128, 128, 3)

  def logits_and_gradients(images, cpu_matmul_convs):
    model = model_lib.Darknet53(num_classes=10, width_multiplier=0.25,
                                stage_depths=(1, 1, 1, 1, 1),
                                cpu_matmul_convs=cpu_matmul_convs,
                                dtype=images.dtype)
    variables = conftest.random_variables(model, 32)

    def loss(params):
      logits, _ = model.apply({**variables, 'params': params}, images,
                              train=True, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(logits)), logits

    return jax.grad(loss, has_aux=True)(variables['params'])

  grads, logits = jax.jit(functools.partial(
      logits_and_gradients, cpu_matmul_convs=True))(images)
  grads_64, logits_64 = _in_float64(functools.partial(
      logits_and_gradients, cpu_matmul_convs=False), images)
  assert _relative_difference(logits, logits_64) < 5e-5
  leaves, _ = jax.tree_util.tree_flatten_with_path(grads)
  assert jax.tree.structure(grads) == jax.tree.structure(grads_64)
  for (path, g), g_64 in zip(leaves, jax.tree.leaves(grads_64), strict=True):
    assert _relative_difference(g, g_64) < 1e-2, jax.tree_util.keystr(path)


def test_unsupported_convolutions_are_refused():
  x = jnp.zeros((1, 8, 8, 2))
  kernel = jnp.zeros((3, 3, 2, 2))
  with pytest.raises(NotImplementedError, match='undilated'):
    conv.conv_general_dilated(x, kernel, (1, 1), ((2, 2), (2, 2)), (1, 1),
                              (2, 2), conv.NHWC_HWIO, 1, None)
