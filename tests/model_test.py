"""Tests for darknet53_jax.model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from darknet53_jax import model as model_lib


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


def _tiny(**kwargs):
  return model_lib.Darknet53(num_classes=7, width_multiplier=0.125,
                             stage_depths=(1, 1, 1, 1, 1), **kwargs)


def test_logits_shape_and_dtype_for_any_multiple_of_32():
  model = _tiny(dtype=jnp.bfloat16)
  images = jnp.ones((2, 64, 96, 3))
  variables = model.init(jax.random.key(0), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  logits = model.apply(variables, images)
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
  variables = _tiny().init(jax.random.key(0), images)
  outputs = [np.asarray(_tiny(activation=a, negative_slope=s).apply(
      variables, images)) for a, s in
             [('leaky_relu', 0.1), ('leaky_relu', 0.01), ('relu', 0.0)]]
  assert not np.allclose(outputs[0], outputs[1])
  assert not np.allclose(outputs[1], outputs[2])


def test_unknown_activation_is_rejected():
  with pytest.raises(ValueError, match='Unknown activation'):
    _tiny(activation='swish').init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))


def test_train_mode_updates_batch_stats():
  model = _tiny()
  images = jax.random.normal(jax.random.key(3), (4, 32, 32, 3)) + 2.0
  variables = model.init(jax.random.key(0), images)
  _, updates = model.apply(variables, images, train=True,
                           mutable=['batch_stats'])
  before = variables['batch_stats']['stem']['bn']['mean']
  after = updates['batch_stats']['stem']['bn']['mean']
  assert not np.allclose(before, after)
