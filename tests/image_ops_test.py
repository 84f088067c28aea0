"""The on-device colour jitter and normalisation."""

import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from darknet53_jax import image_ops


def test_color_jitter_is_torchvisions_brightness_contrast_saturation():
  images = tf.random.stateless_uniform([2, 32, 48, 3], [0, 1], 0.0, 255.0)
  factors = np.array([[1.3, 0.7, 1.2], [0.6, 1.4, 0.8]], np.float32)
  # Jittered through an identity normalisation.
  jittered = image_ops.normalize(images.numpy(), (0.0,) * 3, (1 / 255,) * 3,
                                 jnp.float32, jitter=factors)
  for image, got, (brightness, contrast, saturation) in zip(images, jittered,
                                                            factors):
    # The plain sequence of torchvision's ColorJitter (clipped at the end),
    # written with TensorFlow's image ops.
    expected = image * brightness
    mean = tf.reduce_mean(tf.image.rgb_to_grayscale(expected))
    expected = mean + (expected - mean) * contrast
    grey = tf.image.rgb_to_grayscale(expected)
    expected = tf.clip_by_value(grey + (expected - grey) * saturation, 0, 255)
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_normalize_maps_uint8_to_standardised_values_in_dtype():
  images = np.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3).astype(np.uint8)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  got = image_ops.normalize(images, mean, std, jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  expected = (images / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=1e-2)
  identity = np.ones((2, 3), np.float32)
  np.testing.assert_allclose(
      image_ops.normalize(images, mean, std, jnp.float32, jitter=identity),
      image_ops.normalize(images, mean, std, jnp.float32), atol=1e-5)
