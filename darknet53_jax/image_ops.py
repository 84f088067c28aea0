"""The input pipeline's on-device stage: colour jitter and normalisation.

The host pipeline (``input_pipeline``) decodes, crops, flips and resizes to
uint8 images; the train and eval steps turn them into normalised images in
the compute dtype with these functions: a few elementwise passes over the
batch that XLA fuses into the step. On the host they cost a large share of
the CPU time per train image (docs/data.md), and uint8 sends a quarter of
float32's bytes.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp

# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)


def color_jitter(images: jax.Array, factors: jax.Array) -> jax.Array:
  """torchvision's ColorJitter brightness, contrast, saturation, in order.

  All three are linear in the pixels, so they are composed into one step (a
  scale, an offset and a mix with the grey level); the caller clips once.

  Args:
    images: float32 [batch, height, width, 3] in [0, 255].
    factors: float32 [batch, 3]: brightness, contrast and saturation factors.

  Returns:
    The jittered images, unclipped.
  """
  brightness, contrast, saturation = (factors[:, i, None, None, None]
                                      for i in range(3))
  grey = sum(w * images[..., c:c + 1] for c, w in enumerate(GREY_WEIGHTS))
  # Brightness, then contrast about the mean grey level: scale * x + offset.
  scale = contrast * brightness
  offset = (1.0 - contrast) * brightness * jnp.mean(grey, axis=(1, 2, 3),
                                                    keepdims=True)
  # Saturation mixes x' with grey(x') = scale * grey + offset * sum(weights).
  return ((saturation * scale) * images + ((1.0 - saturation) * scale) * grey
          + offset * (saturation + (1.0 - saturation) * sum(GREY_WEIGHTS)))


def normalize(images: jax.Array, mean_rgb: Sequence[float],
              std_rgb: Sequence[float], dtype: Any,
              jitter: jax.Array | None = None) -> jax.Array:
  """uint8 images to ``(x / 255 - mean) / std`` in ``dtype``.

  Args:
    images: uint8 (or float in [0, 255]) [batch, height, width, 3].
    mean_rgb: per-channel mean, in [0, 1] units.
    std_rgb: per-channel standard deviation, in [0, 1] units.
    dtype: the output dtype.
    jitter: optional [batch, 3] ``color_jitter`` factors, applied (and the
      result clipped to [0, 255]) before normalising.
  """
  x = images.astype(jnp.float32)
  if jitter is not None:
    x = jnp.clip(color_jitter(x, jitter.astype(jnp.float32)), 0.0, 255.0)
  mean = jnp.asarray(mean_rgb, jnp.float32) * 255.0
  std = jnp.asarray(std_rgb, jnp.float32) * 255.0
  return ((x - mean) / std).astype(dtype)
