"""Random erasing (Zhong et al., 2017) as timm's RandomErasing, in
TensorFlow ops on the host's uint8 train images.

timm erases after normalising: it fills the rectangle with N(0, 1) values
(mode 'pixel': one per pixel and channel; 'rand': one per channel; 'const':
zeros), which are colours in the normalised space. Our images leave the host
as uint8 and are normalised on the devices, so each value z becomes the
uint8 level round(255 (mean + std z)), clipped to [0, 255]: the colour that
normalises back to z, up to rounding and the clip (docs/data.md). Every
random choice is drawn by stateless ops from the caller's seed.
"""

import math
from typing import Sequence

import tensorflow as tf

# Mode (config_lib.RANDOM_ERASING_MODES) -> (height, width, seed) -> the
# normalised colours of a height x width rectangle, broadcastable to
# [height, width, 3].
MODES = {
    'pixel': lambda height, width, seed: tf.random.stateless_normal(
        [height, width, 3], seed),
    'rand': lambda height, width, seed: tf.random.stateless_normal([3], seed),
    'const': lambda height, width, seed: tf.zeros([3]),
}
# timm's RandomErasing defaults: the rectangle's area as a fraction of the
# image's, its aspect ratio (height / width, log-uniform), tries.
AREA_RANGE = (0.02, 1 / 3)
ASPECT_RATIO_RANGE = (0.3, 1 / 0.3)
ATTEMPTS = 10


def erase_window(shape, seed):
  """timm's rectangle: the first of ATTEMPTS draws that fits.

  Each try draws an area fraction uniform in AREA_RANGE and a height / width
  ratio log-uniform in ASPECT_RATIO_RANGE; one that fits (strictly smaller
  than the image on both sides) is placed uniformly.

  Args:
    shape: the image's [height, width, ...].
    seed: int [2], the stateless seed.

  Returns:
    (fits, top, left, height, width): int32 scalars, with fits a bool
    (False: no try fitted, nothing is erased).
  """
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  height, width = shape[0], shape[1]
  area = tf.cast(height * width, tf.float32) * tf.random.stateless_uniform(
      [ATTEMPTS], area_seed, *AREA_RANGE)
  ratio = tf.exp(tf.random.stateless_uniform(
      [ATTEMPTS], ratio_seed, *(math.log(r) for r in ASPECT_RATIO_RANGE)))
  heights = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
  widths = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
  fitting = (heights < height) & (widths < width)
  first = tf.argmax(tf.cast(fitting, tf.int32))
  erase_height, erase_width = heights[first], widths[first]
  # Offsets in [0, side - erased side], as timm's random.randint.
  top = tf.random.stateless_uniform([], top_seed, 0, height - erase_height + 1,
                                    tf.int32)
  left = tf.random.stateless_uniform([], left_seed, 0,
                                     width - erase_width + 1, tf.int32)
  return tf.reduce_any(fitting), top, left, erase_height, erase_width


# Plain TensorFlow ops: AutoGraph's conversion would only cost tracing time.
@tf.autograph.experimental.do_not_convert
def random_erasing(image, seed, *, probability: float, mode: str,
                   mean_rgb: Sequence[float], std_rgb: Sequence[float]):
  """With probability ``probability``, erases one rectangle of ``image``.

  Args:
    image: uint8 [height, width, 3].
    seed: int [2], the stateless seed of every random choice.
    probability: timm's re_prob.
    mode: one of MODES (timm's re_mode).
    mean_rgb, std_rgb: the normalisation's, in [0, 1] units.

  Returns:
    uint8 [height, width, 3].
  """
  apply_seed, window_seed, noise_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  fits, top, left, height, width = erase_window(tf.shape(image), window_seed)

  def erase():
    z = MODES[mode](height, width, noise_seed)
    levels = 255.0 * (tf.constant(mean_rgb) + tf.constant(std_rgb) * z)
    colours = tf.cast(tf.clip_by_value(tf.round(levels), 0.0, 255.0),
                      tf.uint8)
    # One copy of the image with the rectangle written in (pads and masks
    # over the whole image cost several times more).
    return tf.raw_ops.TensorStridedSliceUpdate(
        input=image, begin=tf.stack([top, left, 0]),
        end=tf.stack([top + height, left + width, 3]), strides=[1, 1, 1],
        value=tf.broadcast_to(colours, [height, width, 3]))

  applied = tf.random.stateless_uniform([], apply_seed) < probability
  return tf.cond(applied & fits, erase, lambda: image)
