"""Tests for darknet53_jax.rand_augment: timm's ops, rules and policy."""

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest
import tensorflow as tf

from darknet53_jax import rand_augment
from darknet53_jax import rand_augment_spec

FILL = (124, 116, 104)  # timm's: the ImageNet mean, rounded.
HEIGHT, WIDTH = 48, 64
NAMES = tuple(rand_augment.ops(False, FILL))


def _photo():
  """A photo-like uint8 image that uses neither 0 nor 255."""
  rng = np.random.default_rng(0)
  smooth = tf.image.resize(rng.uniform(0, 255, (6, 8, 3)), (HEIGHT, WIDTH),
                           'bicubic').numpy()
  return np.clip(smooth + rng.normal(0, 20, smooth.shape), 20,
                 230).astype(np.uint8)


IMAGE = _photo()


def _affine(matrix):
  return lambda image: image.transform(image.size, Image.AFFINE, matrix,
                                       resample=Image.BILINEAR, fillcolor=FILL)


def _timm_at_level_9(name, increasing, sign):
  """What timm does at magnitude 9: its rules worked out by hand, then the
  PIL call it makes."""
  enhance = 1 + sign * 0.81 if increasing else 1.72
  lut = [min(255, i + 99) if i < 128 else i for i in range(256)] * 3
  return {
      'AutoContrast': ImageOps.autocontrast,
      'Equalize': ImageOps.equalize,
      'Invert': ImageOps.invert,
      'Rotate': lambda image: image.rotate(
          27 * sign, resample=Image.BILINEAR, fillcolor=FILL),
      'Posterize': lambda image: ImageOps.posterize(image,
                                                    1 if increasing else 3),
      'Solarize': lambda image: ImageOps.solarize(image,
                                                  26 if increasing else 230),
      'SolarizeAdd': lambda image: image.point(lut),
      'Color': lambda image: ImageEnhance.Color(image).enhance(enhance),
      'Contrast': lambda image: ImageEnhance.Contrast(image).enhance(enhance),
      'Brightness': lambda image: ImageEnhance.Brightness(image).enhance(
          enhance),
      'Sharpness': lambda image: ImageEnhance.Sharpness(image).enhance(
          enhance),
      'ShearX': _affine((1, 0.27 * sign, 0, 0, 1, 0)),
      'ShearY': _affine((1, 0, 0, 0.27 * sign, 1, 0)),
      'TranslateXRel': _affine((1, 0, 0.405 * sign * WIDTH, 0, 1, 0)),
      'TranslateYRel': _affine((1, 0, 0, 0, 1, 0.405 * sign * HEIGHT)),
  }[name]


def _apply(name, level, increasing=False, negate=False):
  """An op on IMAGE as the pipeline runs it: on uint8, compiled with XLA."""
  op = rand_augment._compiled(  # pylint: disable=protected-access
      rand_augment.ops(increasing, FILL)[name])
  return op(tf.constant(IMAGE), tf.constant(level, tf.float32),
            tf.constant(negate)).numpy()


def test_the_ops_are_timms_rand_augment_set():
  assert NAMES == (
      'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
      'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX',
      'ShearY', 'TranslateXRel', 'TranslateYRel')


# (name, increasing, negate) for every variant and sign that timm tells
# apart.
VARIANTS = (
    [(name, False, False) for name in ('AutoContrast', 'Equalize', 'Invert',
                                       'SolarizeAdd')]
    + [(name, increasing, False) for name in ('Posterize', 'Solarize')
       for increasing in (False, True)]
    + [(name, False, negate) for name in ('Rotate', 'ShearX', 'ShearY',
                                          'TranslateXRel', 'TranslateYRel')
       for negate in (False, True)]
    + [(name, *variant) for name in ('Color', 'Contrast', 'Brightness',
                                     'Sharpness')
       for variant in ((False, False), (True, False), (True, True))])


def test_variants_cover_every_op():
  assert {name for name, _, _ in VARIANTS} == set(NAMES)


@pytest.mark.parametrize('name,increasing,negate', VARIANTS)
def test_op_matches_timm_within_one_level(name, increasing, negate):
  out = _apply(name, 9.0, increasing, negate)
  assert out.shape == (HEIGHT, WIDTH, 3) and out.dtype == np.uint8
  assert not np.array_equal(out, IMAGE)
  expected = np.asarray(_timm_at_level_9(name, increasing, -1 if negate else 1)(
      Image.fromarray(IMAGE)))
  np.testing.assert_allclose(out, expected, atol=1)
  assert np.mean(out == expected) > 0.95


# At magnitude 0, timm's increasing ops leave an image as it is, except
# these.
CHANGING_AT_0 = ('AutoContrast', 'Equalize', 'Invert', 'Posterize')


@pytest.mark.parametrize('name', NAMES)
def test_magnitude_0_of_the_increasing_ops(name):
  out = _apply(name, 0.0, increasing=True)
  assert np.array_equal(out, IMAGE) == (name not in CHANGING_AT_0)


@pytest.mark.parametrize('fraction', [0.25, -0.25])
def test_translate_moves_whole_pixels_and_fills_with_the_colour(fraction):
  out = rand_augment.translate_x_rel(tf.constant(IMAGE, tf.float32),
                                     fraction, FILL).numpy()
  moved, uncovered = (slice(0, 48), slice(48, 64)) if fraction > 0 else (
      slice(16, 64), slice(0, 16))
  source = slice(16, 64) if fraction > 0 else slice(0, 48)
  np.testing.assert_array_equal(out[:, moved], IMAGE[:, source])
  np.testing.assert_array_equal(out[:, uncovered],
                                np.broadcast_to(FILL, (HEIGHT, 16, 3)))


def _augmenter(notation):
  """The RandAugment of ``IMAGE``: seed (int64 [2]) -> uint8 image."""
  spec = rand_augment_spec.parse(notation)
  augment = tf.function(
      lambda seed: rand_augment.rand_augment(IMAGE, seed, spec,
                                             (0.485, 0.456, 0.406)),
      input_signature=[tf.TensorSpec([2], tf.int64)], autograph=False)
  return lambda seeds: np.stack([augment(np.array(s)).numpy() for s in seeds])


def test_rand_augment_is_a_function_of_the_seed():
  seeds = [[i, 7] for i in range(40)]
  augment = _augmenter('rand-m9-mstd0.5-inc1')
  first = augment(seeds)
  assert first.shape == (40, HEIGHT, WIDTH, 3) and first.dtype == np.uint8
  # The same for each seed, in any order, in a newly built graph.
  np.testing.assert_array_equal(first[::-1], augment(seeds[::-1]))
  np.testing.assert_array_equal(
      first[:5], _augmenter('rand-m9-mstd0.5-inc1')(seeds[:5]))
  # With p = 0.5 and 2 ops, about 1/4 are left as they are; most others
  # differ from each other (AutoContrast, Equalize and Invert alone give one
  # image each, whatever the seed).
  changed = {x.tobytes() for x in first if not np.array_equal(x, IMAGE)}
  assert 20 <= len(changed) <= 38
  np.testing.assert_array_equal(_augmenter('rand-m9-p0')(seeds[:3]),
                                np.stack([IMAGE] * 3))


def test_rand_augment_applies_num_ops():
  # One op at magnitude 0: only AutoContrast, Equalize, Invert and Posterize
  # (4 of 15) change the image; with 3 ops, more images change.
  seeds = [[i, 1] for i in range(90)]
  changed = lambda notation: np.mean([
      not np.array_equal(x, IMAGE)
      for x in _augmenter(notation)(seeds)])
  one = changed('rand-m0-n1-p1-inc1')
  three = changed('rand-m0-n3-p1-inc1')
  assert 0.15 < one < 0.42  # 4/15 = 0.27.
  assert three > one + 0.2  # 1 - (11/15)^3 = 0.61.


@pytest.mark.parametrize('notation,low,high', [
    ('rand-m9', 9.0, 9.0),
    ('rand-m15', 10.0, 10.0),  # Clipped to 10 ...
    ('rand-m15-mmax20', 15.0, 15.0),  # ... unless mmax says otherwise.
    ('rand-m9-mstd0.5', 7.0, 10.0),
    ('rand-m9-mstd200', 0.0, 9.0),
])
def test_magnitudes(notation, low, high):
  spec = rand_augment_spec.parse(notation)
  magnitude = rand_augment._magnitude  # pylint: disable=protected-access
  levels = np.array([magnitude(spec, [i, 0]).numpy() for i in range(200)])
  assert levels.min() >= low and levels.max() <= high
  if low < high:
    assert levels.std() > 0.1 * (high - low) and len(set(levels)) > 150
  if notation.endswith('mstd200'):  # Uniform in [0, 9].
    assert levels.min() < 0.5 and levels.max() > 8.5
