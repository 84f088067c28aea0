"""Tests for darknet53_jax.model."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from darknet53_jax import model as model_lib
from tests import conftest


def _abstract_variables(model, size=256):
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


def test_full_model_has_timm_parameter_count():
  variables = _abstract_variables(model_lib.Darknet53(num_classes=1000))
  count = sum(x.size for x in jax.tree.leaves(variables['params']))
  assert count == 41_609_928


def test_batch_stats_cover_every_batchnorm():
  variables = _abstract_variables(model_lib.Darknet53())
  # 52 convs, each with a BatchNorm holding mean and var.
  assert len(jax.tree.leaves(variables['batch_stats'])) == 52 * 2


def test_yolo_feature_maps_at_416():
  model = model_lib.Darknet53()
  variables = _abstract_variables(model)
  features = jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros((2, 416, 416, 3)),
                            features_only=True), variables)
  assert [f.shape for f in features] == [
      (2, 52, 52, 256), (2, 26, 26, 512), (2, 13, 13, 1024)]


def _init(model, images):
  """``model.init``, jitted: one compile, not one per operation."""
  return jax.jit(model.init)(jax.random.key(0), images)


def _apply(model, variables, images, **kwargs):
  """``model.apply(variables, images, **kwargs)``, jitted."""
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, images)


def _tiny(**kwargs):
  return model_lib.Darknet53(num_classes=7, width_multiplier=0.125,
                             stage_depths=(1, 1, 1, 1, 1), **kwargs)


def test_logits_shape_and_dtype_for_any_multiple_of_32():
  model = _tiny(dtype=jnp.bfloat16)
  images = jnp.ones((2, 64, 96, 3))
  variables = _init(model, images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  logits = _apply(model, variables, images)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32


def test_stride_two_convs_pad_symmetrically():
  """The first down-sampling conv sees rows -1..1, as Darknet/PyTorch do
  (Flax 'SAME' would see rows 0..2 on an even-sized input)."""
  block = model_lib.ConvBN(features=4, kernel_size=3, strides=2,
                           activation=lambda x: x)
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 3))
  variables = block.init(jax.random.key(0), x, train=False)
  conv = jax.lax.conv_general_dilated(
      x, variables['params']['conv']['kernel'], (2, 2), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  expected = conv / np.sqrt(1.0 + 1e-5)  # Fresh BN: mean 0, var 1.
  np.testing.assert_allclose(block.apply(variables, x, train=False), expected,
                             rtol=1e-5, atol=1e-6)


def test_activation_choices_change_the_function():
  images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  variables = _init(_tiny(), images)
  outputs = [np.asarray(_apply(_tiny(activation=a, negative_slope=s),
                               variables, images)) for a, s in
             [('leaky_relu', 0.1), ('leaky_relu', 0.01), ('relu', 0.0)]]
  assert not np.allclose(outputs[0], outputs[1])
  assert not np.allclose(outputs[1], outputs[2])


@pytest.mark.parametrize('field', ['activation', 'kernel_init', 'head_init'])
def test_unknown_choices_are_rejected(field):
  with pytest.raises(ValueError, match=f'Unknown {field}'):
    _tiny(**{field: 'swish'}).init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))


def test_train_mode_updates_batch_stats():
  model = _tiny()
  images = jax.random.normal(jax.random.key(3), (4, 32, 32, 3)) + 2.0
  variables = _init(model, images)
  _, updates = _apply(model, variables, images, train=True,
                      mutable=['batch_stats'])
  before = variables['batch_stats']['stem']['bn']['mean']
  after = updates['batch_stats']['stem']['bn']['mean']
  assert not np.allclose(before, after)


def _batch_statistics(model, variables, images, layer):
  """A layer's BatchNorm input: its mean and biased variance over N, H, W,
  and the count of values per channel."""
  _, state = _apply(model, variables, images, train=True,
                    capture_intermediates=True,
                    mutable=['batch_stats', 'intermediates'])
  x = np.asarray(state['intermediates'][layer]['conv']['__call__'][0],
                 np.float64)
  return x.mean((0, 1, 2)), x.var((0, 1, 2)), x.size // x.shape[-1]


@pytest.mark.parametrize('momentum', [0.9, 0.1])
@pytest.mark.parametrize('unbiased', [False, True])
def test_running_statistics_follow_momentum_and_variance_choice(momentum,
                                                                unbiased):
  model = _tiny(bn_momentum=momentum, bn_unbiased_variance=unbiased)
  variables = conftest.random_variables(model, 32)
  images = jax.random.normal(jax.random.key(4), (4, 32, 32, 3)) + 1.0
  _, updates = _apply(model, variables, images, train=True,
                      mutable=['batch_stats'])
  # 1x1 maps: n is the batch, 4, so n / (n - 1) is far from 1.
  layer = 'stage4_down'
  mean, var, n = _batch_statistics(model, variables, images, layer)
  assert n == 4
  if unbiased:
    var *= n / (n - 1)
  old = variables['batch_stats'][layer]['bn']
  new = updates['batch_stats'][layer]['bn']
  # momentum weighs the old value (Flax's and MindSpore's convention).
  np.testing.assert_allclose(
      new['mean'], momentum * old['mean'] + (1 - momentum) * mean,
      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      new['var'], momentum * old['var'] + (1 - momentum) * var, rtol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.float16])
@pytest.mark.parametrize('train', [False, True])
def test_biased_batch_norm_is_flax_batch_norm_bitwise(dtype, train):
  x = (jax.random.normal(jax.random.key(5), (4, 6, 6, 8)) * 3 + 1).astype(
      dtype)
  flax_bn = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         dtype=dtype)
  ours = model_lib.BatchNorm(use_running_average=not train, momentum=0.9,
                             dtype=dtype)
  variables = flax_bn.init(jax.random.key(0), x)
  variables = jax.tree.map(lambda v: v + 0.25, variables)
  conftest.assert_trees_equal(
      ours.apply(variables, x, mutable=['batch_stats']),
      flax_bn.apply(variables, x, mutable=['batch_stats']))


@pytest.mark.parametrize('dtype', [jnp.float16, jnp.bfloat16])
def test_batch_norm_computes_in_float32_and_returns_the_compute_dtype(dtype):
  bn = model_lib.BatchNorm(use_running_average=False, dtype=dtype)
  x = jnp.ones((2, 4, 4, 8), dtype)
  variables = bn.init(jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(lambda v, x: bn.apply(v, x, mutable=['batch_stats']))(
      variables, x)
  arithmetic = [eqn for eqn in jaxpr.eqns
                if eqn.primitive.name != 'convert_element_type']
  assert arithmetic
  # Statistics, running averages and the affine map: all float32; only the
  # casts touch the 16-bit dtype, and the output is in it.
  assert {v.aval.dtype for eqn in arithmetic for v in eqn.outvars
          if hasattr(v.aval, 'dtype')} == {jnp.dtype(jnp.float32)}
  assert jaxpr.out_avals[0].dtype == dtype


def _kernels(model, size=32):
  variables = jax.jit(model.init, static_argnames='train')(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  return {jax.tree_util.keystr(path): np.asarray(leaf, np.float64)
          for path, leaf in jax.tree_util.tree_leaves_with_path(
              variables['params']) if path[-1].key == 'kernel'}


def test_initialisers_have_their_distributions():
  """Full-width convolutions (one block per stage) and a 1000-way head."""
  he = _kernels(model_lib.Darknet53(stage_depths=(1, 1, 1, 1, 1)))
  xavier = _kernels(model_lib.Darknet53(
      stage_depths=(1, 1, 1, 1, 1), kernel_init='xavier_uniform',
      head_init='truncated_normal'))
  for name, kernel in xavier.items():
    # A sample std is within a few 1/sqrt(2 size) of the true one.
    rtol = 5 / np.sqrt(2 * kernel.size)
    if name.startswith("['head']"):
      # N(0, 0.01^2) cut at +-2 std: std 0.01 * 0.87962566.
      assert np.abs(kernel).max() <= 0.02
      np.testing.assert_allclose(kernel.std(), 0.01 * 0.87962566, rtol=rtol)
      np.testing.assert_allclose(he[name].std(),
                                 np.sqrt(1 / kernel.shape[0]), rtol=rtol)
      continue
    *taps, fan_in, fan_out = kernel.shape
    receptive = np.prod(taps)
    bound = np.sqrt(6 / (receptive * (fan_in + fan_out)))
    assert np.abs(kernel).max() <= bound
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=rtol)
    np.testing.assert_allclose(he[name].std(),
                               np.sqrt(2 / (receptive * fan_in)), rtol=rtol)
