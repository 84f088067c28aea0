"""Tests for darknet53_jax.random_erasing."""

import numpy as np
import pytest
import tensorflow as tf

from darknet53_jax import config_lib
from darknet53_jax import random_erasing

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 64


def test_every_mode_the_config_allows_has_colours():
  assert set(random_erasing.MODES) == set(config_lib.RANDOM_ERASING_MODES)


def test_window_follows_timm():
  shape = tf.constant([224, 160, 3])
  windows = tf.data.Dataset.range(400).map(lambda i: tf.stack([
      tf.cast(x, tf.int32)
      for x in random_erasing.erase_window(shape, tf.stack([i, i]))]))
  fits, top, left, height, width = np.array(
      list(windows.as_numpy_iterator())).T
  # One of 10 tries almost always fits; the others are placed inside.
  assert fits.mean() > 0.99
  top, left, height, width = (x[fits == 1] for x in (top, left, height,
                                                     width))
  assert (top >= 0).all() and (top + height <= 224).all()
  assert (left >= 0).all() and (left + width <= 160).all()
  assert (height < 224).all() and (width < 160).all()
  # Area in [0.02, 1/3] of the image, and aspect ratio in [0.3, 1 / 0.3],
  # up to the rounding of each side to whole pixels.
  area = height * width / (224 * 160)
  assert area.min() >= 0.02 * 0.9 and area.max() <= 1 / 3 * 1.1
  assert area.min() < 0.03 and area.max() > 0.3  # The whole range is used.
  ratio = height / width
  assert ratio.min() >= 0.3 * 0.9 and ratio.max() <= 1 / 0.3 * 1.1
  assert ratio.min() < 0.4 and ratio.max() > 2.5
  assert top.max() > 100 and left.max() > 60  # Placed anywhere.


def _erase(image, seeds, probability=1.0, mode='pixel'):
  erase = tf.function(
      lambda seed: random_erasing.random_erasing(
          image, seed, probability=probability, mode=mode, mean_rgb=MEAN,
          std_rgb=STD),
      input_signature=[tf.TensorSpec([2], tf.int64)], autograph=False)
  return np.stack([erase(np.array([s, 3])).numpy() for s in seeds])


def _rectangle(changed):
  """The bounding box of ``changed`` (a [height, width] bool mask)."""
  rows, columns = np.nonzero(changed)
  return (slice(rows.min(), rows.max() + 1),
          slice(columns.min(), columns.max() + 1))


@pytest.mark.parametrize('mode', ['const', 'rand'])
def test_erases_one_rectangle_and_nothing_else(mode):
  image = np.zeros([SIZE, SIZE, 3], np.uint8)  # No colour erases to black.
  for out in _erase(image, range(20), mode=mode):
    changed = (out != image).any(-1)
    box = _rectangle(changed)
    assert changed[box].all()  # A full rectangle, and nothing outside it.
    assert changed.sum() == changed[box].size
    assert 0.02 * 0.8 < changed.mean() < 1 / 3 * 1.2
    colours = np.unique(out[box].reshape(-1, 3), axis=0)
    assert len(colours) == 1  # One colour.
    if mode == 'const':  # The mean, which normalises to 0.
      np.testing.assert_array_equal(colours[0], [124, 116, 104])


def test_pixel_mode_is_normal_noise_in_the_normalised_space():
  image = np.zeros([SIZE, SIZE, 3], np.uint8)
  z = []
  for out in _erase(image, range(10)):
    box = _rectangle((out != image).any(-1))
    z.append(((out[box] / 255 - MEAN) / STD).reshape(-1, 3))
  z = np.concatenate(z)
  # N(0, 1), but clipped to the uint8 range (about 2.1 to 2.4 std) and
  # rounded to whole levels.
  np.testing.assert_allclose(z.mean(0), 0, atol=0.05)
  np.testing.assert_allclose(z.std(0), 0.96, atol=0.05)
  assert (np.abs(z) > 2).mean() > 0.02


def test_erasing_is_a_function_of_the_seed_and_probability():
  image = np.full([SIZE, SIZE, 3], 77, np.uint8)
  seeds = range(100)
  outputs = _erase(image, seeds, probability=0.25)
  np.testing.assert_array_equal(outputs[::-1],
                                _erase(image, seeds[::-1], probability=0.25))
  erased = [out.tobytes() for out in outputs
            if not np.array_equal(out, image)]
  assert 12 <= len(erased) <= 40  # About 25.
  assert len(set(erased)) == len(erased)  # Different rectangles and noise.
  # A higher probability erases the same images and more.
  more = _erase(image, seeds, probability=0.5)
  assert all(np.array_equal(a, b) for a, b in zip(outputs, more)
             if not np.array_equal(a, image))
  assert np.mean([not np.array_equal(x, image) for x in more]) > len(
      erased) / 100 + 0.1
  np.testing.assert_array_equal(_erase(image, seeds[:3], probability=0.0),
                                np.stack([image] * 3))
