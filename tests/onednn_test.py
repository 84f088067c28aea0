"""oneDNN's convolutions equal XLA's, values and gradients, and step aside
where they cannot run.

References are XLA's convolution in float64 on the same inputs (rounded to
bfloat16 first where the convolution runs in bfloat16).
"""

import functools
import importlib.metadata

import jax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from darknet53_jax import conv
from darknet53_jax import model as model_lib
from darknet53_jax import onednn
from tests import conftest

needs_onednn = pytest.mark.skipif(
    not onednn.enabled(), reason='oneDNN convolutions cannot run here '
    "(pip install '.[onednn]' on an x86-64 Linux CPU with AVX-512)")

# Relative to the largest value; measured on an Intel Xeon (AMX): float32
# within 4.4e-7 of float64, bfloat16 (each result rounded to 8 significant
# bits after float32 sums) within 3.3e-3. A wrong tap or pass is O(1) off.
TOLERANCE = {jnp.float32: 2e-6, jnp.bfloat16: 8e-3}

# (kernel size, strides, padding, side): 'SAME' 1x1 and 3x3, Darknet-53's
# stride-2 3x3, and asymmetric padding with unequal strides.
CASES = [(1, (1, 1), ((0, 0), (0, 0)), 6),
         (3, (1, 1), ((1, 1), (1, 1)), 6),
         (3, (2, 2), ((1, 1), (1, 1)), 7),
         (3, (2, 1), ((0, 1), (1, 0)), 8)]


def _relative_difference(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _operands(rng, dtype, size, strides, padding, side, batch=3):
  """x, kernel and an output gradient, of ``dtype``, 16 -> 24 features."""
  x = rng.normal(size=(batch, side, side, 16))
  kernel = rng.normal(size=(size, size, 16, 24))
  rows, cols = ((side + low + high - size) // stride + 1
                for (low, high), stride in zip(padding, strides))
  dy = rng.normal(size=(batch, rows, cols, 24))
  return [jnp.asarray(a, dtype) for a in (x, kernel, dy)]


def _value_and_gradients(conv_fn, strides, padding, x, kernel, dy):
  y, vjp = jax.vjp(lambda x, kernel: conv_fn(x, kernel, strides, padding),
                   x, kernel)
  return (y, *vjp(dy))


def _xla_conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=conv.NHWC_HWIO)


def _reference(strides, padding, *operands):
  """XLA's output and gradients in float64."""
  with jax.enable_x64(True):
    return jax.device_get(jax.jit(functools.partial(
        _value_and_gradients, _xla_conv, strides, padding))(
            *[jnp.asarray(a, jnp.float64) for a in operands]))


@needs_onednn
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16],
                         ids=['float32', 'bfloat16'])
@pytest.mark.parametrize('size, strides, padding, side', CASES)
def test_values_and_gradients_equal_xla(size, strides, padding, side, dtype):
  operands = _operands(np.random.default_rng(side), dtype, size, strides,
                       padding, side)
  ours = jax.jit(functools.partial(
      _value_and_gradients, onednn.conv, strides, padding))(*operands)
  for name, a, b in zip(('output', 'input gradient', 'kernel gradient'),
                        ours, _reference(strides, padding, *operands)):
    assert a.dtype == dtype and a.shape == b.shape, name
    assert _relative_difference(a, b) < TOLERANCE[dtype], name


@needs_onednn
def test_gradients_of_a_replicated_kernel_under_shard_map():
  """As in the train step: the batch split over devices, the kernel not."""
  strides, padding = (2, 2), ((1, 1), (1, 1))
  x, kernel, dy = _operands(np.random.default_rng(0), jnp.bfloat16, 3,
                            strides, padding, 8, batch=2 * jax.device_count())
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  specs = (P('data'), P(), P('data'))

  def local(x, kernel, dy):
    def loss(x, kernel):
      y = conv.cpu_conv_general_dilated(x, kernel, strides, padding, (1, 1),
                                        (1, 1), conv.NHWC_HWIO, 1, None)
      return lax.psum(jnp.sum(y.astype(jnp.float32) * dy), 'data')
    return jax.grad(loss, argnums=(0, 1))(x, kernel)

  step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs,
                               out_specs=specs[:2]))
  sharded = [jax.device_put(a, NamedSharding(mesh, spec))
             for a, spec in zip((x, kernel, dy), specs)]
  assert 'darknet53_onednn_conv' in step.lower(*sharded).as_text()
  _, *reference = _reference(strides, padding, x, kernel, dy)
  for name, a, b in zip(('input gradient', 'kernel gradient'),
                        step(*sharded), reference):
    assert _relative_difference(a, b) < TOLERANCE[jnp.bfloat16], name


def _darknet_train_program(dtype) -> str:
  """The lowered text of a tiny Darknet-53's gradient in ``dtype``."""
  model = model_lib.Darknet53(num_classes=10, width_multiplier=0.125,
                              stage_depths=(1, 1, 1, 1, 1), dtype=dtype)
  variables = conftest.random_variables(model, 32)
  images = jnp.zeros((2, 32, 32, 3), dtype)

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, images,
                            train=True, mutable=['batch_stats'])
    return jnp.sum(logits.astype(jnp.float32))

  return jax.jit(jax.grad(loss)).lower(variables['params']).as_text()


@needs_onednn
def test_darknet53_runs_its_bfloat16_convolutions_only_on_onednn():
  bfloat16 = _darknet_train_program(jnp.bfloat16)
  for name in ('forward', 'input_gradient', 'kernel_gradient'):
    assert f'darknet53_onednn_conv_{name}' in bfloat16
  assert 'convolution' not in bfloat16
  assert 'darknet53_onednn_conv' not in _darknet_train_program(jnp.float32)


@pytest.fixture
def fresh_availability():
  """``onednn`` decides again, here and after the test."""
  onednn._unavailable_reason.cache_clear()
  yield
  onednn._unavailable_reason.cache_clear()


def test_the_switch_turns_it_off(monkeypatch, fresh_availability):
  monkeypatch.setenv(onednn.SWITCH, '0')
  assert not onednn.enabled()
  assert 'darknet53_onednn_conv' not in _darknet_train_program(jnp.bfloat16)


def test_without_the_package_it_is_off_and_says_what_to_install(
    monkeypatch, fresh_availability):
  def distribution(name):
    raise importlib.metadata.PackageNotFoundError(name)
  monkeypatch.delenv(onednn.SWITCH, raising=False)
  monkeypatch.setattr(importlib.metadata, 'distribution', distribution)
  assert not onednn.enabled()
  assert "pip install 'darknet53_jax[onednn]'" in (
      onednn._unavailable_reason())
