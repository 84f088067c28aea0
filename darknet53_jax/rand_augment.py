"""RandAugment (Cubuk et al., 2019) as timm applies it, in TensorFlow ops.

Runs in the host pipeline (``input_pipeline.preprocess_train``) on the uint8
train crop after the random-resized crop, flip and resize, with every random
choice drawn by stateless ops from the caller's seed.

The 15 ops, their order and their magnitude-to-argument rules are timm's
(``timm/data/auto_augment.py``: ``_RAND_TRANSFORMS``,
``_RAND_INCREASING_TRANSFORMS``, ``LEVEL_TO_ARG``); the pixel arithmetic
follows the PIL functions that timm calls (ImageOps, ImageEnhance,
Image.transform), to within one grey level. The geometric ops always sample
bilinearly (docs/data.md lists the differences from timm).

The ops take and return float32 [height, width, 3] images holding integers
in [0, 255]; ``rand_augment`` runs each one compiled with XLA on uint8
images.
"""

import functools
import math
from typing import Callable, Sequence

import tensorflow as tf

from darknet53_jax import rand_augment_spec

# Each op: (image, level, negate) -> image, where level is the magnitude
# (float32, >= 0) and negate a bool drawn with probability 1/2, which the
# ops with a signed argument use as its sign.
Op = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]

# PIL's convert('L'): ITU-R 601-2 luma in 16-bit fixed point.
_LUMA_WEIGHTS = (19595, 38470, 7471)


def _to_float(value) -> tf.Tensor:
  return tf.cast(value, tf.float32)


def _blend(degenerate, image, factor):
  """PIL's Image.blend(degenerate, image, factor), truncated to uint8."""
  return tf.clip_by_value(
      tf.floor(degenerate + factor * (image - degenerate)), 0.0, 255.0)


def _grey(image):
  """PIL's convert('L'): [height, width], rounded as its fixed point."""
  weighted = sum(w * image[..., c] for c, w in enumerate(_LUMA_WEIGHTS))
  return tf.floor((weighted + 2.0**15) / 2.0**16)


def auto_contrast(image):
  """PIL's ImageOps.autocontrast: each channel stretched to [0, 255]."""
  low = tf.reduce_min(image, axis=(0, 1))
  high = tf.reduce_max(image, axis=(0, 1))
  stretched = tf.floor((image - low) * 255.0 / tf.maximum(high - low, 1.0))
  return tf.where(high > low, stretched, image)


def equalize(image):
  """PIL's ImageOps.equalize: each channel's histogram equalised."""
  # Channel c's values are counted in bins [256 c, 256 c + 256).
  bins = tf.cast(image, tf.int32) + 256 * tf.range(3)
  histograms = tf.reshape(tf.math.unsorted_segment_sum(
      tf.ones_like(bins), bins, 3 * 256), [3, 256])
  top_count = tf.gather(histograms,
                        tf.cast(tf.reduce_max(image, axis=(0, 1)), tf.int32),
                        batch_dims=1)
  step = (tf.reduce_sum(histograms, axis=1) - top_count) // 255
  lut = ((step[:, None] // 2 + tf.cumsum(histograms, axis=1, exclusive=True))
         // tf.maximum(step, 1)[:, None])
  equalized = tf.gather(tf.reshape(tf.minimum(lut, 255), [-1]), bins)
  return tf.where(step > 0, _to_float(equalized), image)


def invert(image):
  return 255.0 - image


def posterize(image, bits):
  """Keeps the ``bits`` (0-8) most significant bits of every value."""
  step = tf.pow(2.0, 8.0 - _to_float(bits))
  return tf.floor(image / step) * step


def solarize(image, threshold):
  """PIL's ImageOps.solarize: inverts the values >= threshold."""
  return tf.where(image >= threshold, 255.0 - image, image)


def solarize_add(image, addition, threshold=128.0):
  """timm's solarize_add: adds to the values < threshold, saturating."""
  return tf.where(image < threshold, tf.minimum(image + addition, 255.0),
                  image)


def color(image, factor):
  """PIL's ImageEnhance.Color: 0 grey, 1 the image."""
  return _blend(_grey(image)[..., None], image, factor)


def contrast(image, factor):
  """PIL's ImageEnhance.Contrast: 0 the mean grey, 1 the image."""
  return _blend(tf.floor(tf.reduce_mean(_grey(image)) + 0.5), image, factor)


def brightness(image, factor):
  """PIL's ImageEnhance.Brightness: 0 black, 1 the image."""
  return _blend(0.0, image, factor)


def sharpness(image, factor):
  """PIL's ImageEnhance.Sharpness: 0 smoothed, 1 the image, 2 sharpened."""
  # PIL's SMOOTH filter, (the 3x3 sum + 4 x the centre) / 13, as shifted
  # sums (XLA:CPU runs them far faster than a depthwise convolution).
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  padded = tf.pad(image, [[1, 1], [1, 1], [0, 0]])
  window_sum = sum(padded[i:i + height, j:j + width]
                   for i in range(3) for j in range(3))
  smoothed = tf.round((window_sum + 4.0 * image) / 13.0)
  # PIL's filter leaves the one-pixel border as it was.
  rows, columns = tf.range(height)[:, None], tf.range(width)[None, :]
  border = ((rows == 0) | (rows == height - 1) | (columns == 0) |
            (columns == width - 1))
  return _blend(tf.where(border[..., None], image, smoothed), image, factor)


def _lerp(start, end, weight):
  """PIL's BILINEAR step: start + (end - start) * weight."""
  return start + (end - start) * weight


def affine(image, matrix: Sequence, fill: Sequence[float]):
  """PIL's Image.transform(size, AFFINE, matrix), bilinear, filled.

  As PIL: an output pixel whose source point lies outside the input gets
  ``fill``; one inside interpolates the four pixels around the point (their
  indices clamped to the input) and is truncated to an integer.

  Args:
    image: float32 [height, width, 3].
    matrix: (a, b, c, d, e, f): the output point (x, y) samples the input at
      (a x + b y + c, d x + e y + f), in PIL's coordinates (pixel i spans
      [i, i + 1], so its centre is i + 0.5).
    fill: the colour of output pixels that sample outside the input, [3].
  """
  a, b, c, d, e, f = (_to_float(v) for v in matrix)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  y, x = tf.meshgrid(tf.range(_to_float(height)) + 0.5,
                     tf.range(_to_float(width)) + 0.5, indexing='ij')
  source_x, source_y = a * x + b * y + c, d * x + e * y + f
  inside = ((source_x >= 0) & (source_x < _to_float(width)) &
            (source_y >= 0) & (source_y < _to_float(height)))
  # The pixel whose centre is up and left of the point, and the weights of
  # the next pixels right and down.
  left, top = tf.floor(source_x - 0.5), tf.floor(source_y - 0.5)
  right_weight = (source_x - 0.5 - left)[..., None]
  down_weight = (source_y - 0.5 - top)[..., None]
  left, top = tf.cast(left, tf.int32), tf.cast(top, tf.int32)
  pixels = tf.reshape(image, [-1, 3])

  def at(row, column):
    return tf.gather(pixels, tf.clip_by_value(row, 0, height - 1) * width +
                     tf.clip_by_value(column, 0, width - 1))

  upper = _lerp(at(top, left), at(top, left + 1), right_weight)
  lower = _lerp(at(top + 1, left), at(top + 1, left + 1), right_weight)
  return tf.where(inside[..., None], tf.floor(_lerp(upper, lower, down_weight)),
                  tf.constant(fill, tf.float32))


def rotate(image, degrees, fill):
  """PIL's Image.rotate(degrees) about the centre: counter-clockwise."""
  height, width = (_to_float(s) for s in tf.unstack(tf.shape(image)[:2]))
  angle = -degrees * math.pi / 180.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  centre_x, centre_y = width / 2.0, height / 2.0
  return affine(image, (cos, sin, centre_x - cos * centre_x - sin * centre_y,
                        -sin, cos, centre_y + sin * centre_x - cos * centre_y),
                fill)


def shear_x(image, factor, fill):
  return affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image, factor, fill):
  return affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


def translate_x_rel(image, fraction, fill):
  """Moves the content left by ``fraction`` of the width (right if < 0)."""
  width = _to_float(tf.shape(image)[1])
  return affine(image, (1.0, 0.0, fraction * width, 0.0, 1.0, 0.0), fill)


def translate_y_rel(image, fraction, fill):
  """Moves the content up by ``fraction`` of the height (down if < 0)."""
  height = _to_float(tf.shape(image)[0])
  return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, fraction * height), fill)


# timm's magnitude-to-argument rules.


def _scaled(level, full_strength):
  """The argument at full strength times level / LEVEL_DENOM.

  Multiplied first: an integer magnitude then gives timm's argument exactly
  (in float32, (level / 10) * x can fall just below an integer that timm's
  float64 reaches, and the rules that truncate would lose one).
  """
  return level * full_strength / rand_augment_spec.LEVEL_DENOM


def _signed(value, negate):
  return tf.where(negate, -value, value)


def _rotate_degrees(level, negate):
  return _signed(_scaled(level, 30.0), negate)


def _posterize_bits(level, negate):
  del negate  # Unsigned.
  return tf.clip_by_value(tf.floor(_scaled(level, 4.0)), 0.0, 8.0)


def _posterize_increasing_bits(level, negate):
  return tf.maximum(4.0 - _posterize_bits(level, negate), 0.0)


def _solarize_threshold(level, negate):
  del negate  # Unsigned.
  return tf.minimum(tf.floor(_scaled(level, 256.0)), 256.0)


def _solarize_increasing_threshold(level, negate):
  return 256.0 - _solarize_threshold(level, negate)


def _solarize_addition(level, negate):
  del negate  # Unsigned.
  return tf.minimum(tf.floor(_scaled(level, 110.0)), 128.0)


def _enhance_factor(level, negate):
  del negate  # Unsigned: from 0.1 (level 0) to 1.9 (level 10).
  return _scaled(level, 1.8) + 0.1


def _enhance_increasing_factor(level, negate):
  return tf.maximum(1.0 + _signed(_scaled(level, 0.9), negate), 0.1)


def _shear_factor(level, negate):
  return _signed(_scaled(level, 0.3), negate)


def _translate_fraction(level, negate):
  return _signed(_scaled(level, 0.45), negate)


def _op(fn, level_to_arg=None, **kwargs) -> Op:
  """An ``Op`` from fn(image[, arg], **kwargs) and its argument rule."""
  if level_to_arg is None:
    return lambda image, level, negate: fn(image)
  return lambda image, level, negate: fn(
      image, level_to_arg(level, negate), **kwargs)


def ops(increasing: bool, fill: Sequence[float]) -> dict[str, Op]:
  """timm's RandAugment ops in its order, by its name for the op.

  Args:
    increasing: the variants whose strength grows with the magnitude (timm's
      ``*Increasing`` ops, named here without the suffix).
    fill: the colour that the geometric ops fill with, [3] in [0, 255].
  """
  enhance = _enhance_increasing_factor if increasing else _enhance_factor
  return {
      'AutoContrast': _op(auto_contrast),
      'Equalize': _op(equalize),
      'Invert': _op(invert),
      'Rotate': _op(rotate, _rotate_degrees, fill=fill),
      'Posterize': _op(posterize, _posterize_increasing_bits if increasing
                       else _posterize_bits),
      'Solarize': _op(solarize, _solarize_increasing_threshold if increasing
                      else _solarize_threshold),
      'SolarizeAdd': _op(solarize_add, _solarize_addition),
      'Color': _op(color, enhance),
      'Contrast': _op(contrast, enhance),
      'Brightness': _op(brightness, enhance),
      'Sharpness': _op(sharpness, enhance),
      'ShearX': _op(shear_x, _shear_factor, fill=fill),
      'ShearY': _op(shear_y, _shear_factor, fill=fill),
      'TranslateXRel': _op(translate_x_rel, _translate_fraction, fill=fill),
      'TranslateYRel': _op(translate_y_rel, _translate_fraction, fill=fill),
  }


def fill_colour(mean_rgb: Sequence[float]) -> tuple[int, ...]:
  """timm's fill colour: the mean, in [0, 1] units, as uint8 levels."""
  return tuple(min(255, round(255 * m)) for m in mean_rgb)


def _magnitude(spec: rand_augment_spec.RandAugmentSpec, seed) -> tf.Tensor:
  """One op's magnitude: noisy as the spec says, clipped to [0, mmax]."""
  if spec.magnitude_std == math.inf:
    level = tf.random.stateless_uniform([], seed, 0.0, spec.magnitude)
  elif spec.magnitude_std > 0:
    level = spec.magnitude + spec.magnitude_std * tf.random.stateless_normal(
        [], seed)
  else:
    level = tf.constant(spec.magnitude, tf.float32)
  return tf.clip_by_value(level, 0.0, float(spec.magnitude_max))


def _compiled(op: Op) -> Op:
  """``op`` on uint8 images, compiled with XLA.

  One fused program per op and image size: on CPUs several times faster
  than TensorFlow's kernels run op by op. Each op is compiled on its own
  (in a fraction of a second, when first drawn); one program holding all
  of them behind a switch took XLA tens of seconds to compile.
  """
  return tf.function(
      lambda image, level, negate: tf.cast(
          op(_to_float(image), level, negate), tf.uint8),
      jit_compile=True, autograph=False)


# Plain TensorFlow ops: AutoGraph's conversion would only cost tracing time.
@tf.autograph.experimental.do_not_convert
def rand_augment(image, seed, spec: rand_augment_spec.RandAugmentSpec,
                 mean_rgb: Sequence[float]):
  """timm's RandAugment of one image.

  ``spec.num_ops`` times: an op drawn uniformly from the 15 (with
  replacement), applied with probability ``spec.prob`` at a magnitude drawn
  afresh (``spec.magnitude_std``) and a random sign where the op has one.

  Args:
    image: uint8 [height, width, 3].
    seed: int [2], the stateless seed of every random choice.
    spec: the policy.
    mean_rgb: the dataset's mean, in [0, 1] units: the fill colour of the
      geometric ops (``fill_colour``).

  Returns:
    The augmented image, uint8 [height, width, 3].
  """
  branches = [_compiled(op) for op in
              ops(spec.increasing, fill_colour(mean_rgb)).values()]
  skip = len(branches)  # The branch index of "not applied".
  for layer_seed in tf.unstack(
      tf.random.experimental.stateless_split(seed, spec.num_ops)):
    choice_seed, apply_seed, magnitude_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seed, 4))
    choice = tf.random.stateless_uniform([], choice_seed, 0, skip, tf.int32)
    applied = tf.random.stateless_uniform([], apply_seed) < spec.prob
    level = _magnitude(spec, magnitude_seed)
    negate = tf.random.stateless_uniform([], sign_seed) < 0.5
    image = tf.switch_case(
        tf.where(applied, choice, skip),
        [functools.partial(op, image, level, negate) for op in branches]
        + [functools.partial(tf.identity, image)])
  return image
