"""The CPU matmul convolutions equal XLA's, values and gradients."""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from darknet53_jax import conv


def _relative_difference(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize('size, strides', [(1, 1), (3, 1), (3, 2)])
def test_values_and_gradients_equal_xla(size, strides):
  rng = np.random.default_rng(size + strides)
  x = jnp.asarray(rng.normal(size=(4, 12, 12, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(size, size, 6, 5)), jnp.float32)
  pad = size // 2

  def loss(fn, x, kernel):
    y = fn(x, kernel, (strides, strides), ((pad, pad), (pad, pad)), (1, 1),
           (1, 1), conv.NHWC_HWIO, 1, precision=None)
    return jnp.sum(jnp.sin(y)), y  # A non-constant output gradient.

  ours = jax.jit(jax.grad(lambda *a: loss(conv.conv_general_dilated, *a),
                          argnums=(0, 1), has_aux=True))(x, kernel)
  xla = jax.jit(jax.grad(lambda *a: loss(lax.conv_general_dilated, *a),
                         argnums=(0, 1), has_aux=True))(x, kernel)
  (dx, dkernel), y = ours
  (dx_xla, dkernel_xla), y_xla = xla
  assert y.shape == y_xla.shape
  assert _relative_difference(y, y_xla) < 1e-6
  assert _relative_difference(dx, dx_xla) < 1e-5
  assert _relative_difference(dkernel, dkernel_xla) < 1e-5


def test_unsupported_convolutions_are_refused():
  x = jnp.zeros((1, 8, 8, 2))
  kernel = jnp.zeros((3, 3, 2, 2))
  with pytest.raises(NotImplementedError, match='undilated'):
    conv.conv_general_dilated(x, kernel, (1, 1), ((2, 2), (2, 2)), (1, 1),
                              (2, 2), conv.NHWC_HWIO, 1, None)
