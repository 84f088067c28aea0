"""Mixup and CutMix, on the devices, with timm's ``Mixup`` semantics in mode
'batch': one draw per batch, the partner of each image being the image at
the mirrored position (the batch reversed).

The train step mixes each device's slice (each micro-batch, with gradient
accumulation) of the normalised images on its own: the draw's key is a pure
function of (seed, step, device, micro-batch), so resumed runs repeat it and
devices draw different mixes.

A draw is a per-pixel weight of the image itself, in a map shared by the
batch, and the weight ``lam`` of its own targets: Mixup weighs every pixel
by lam ~ Beta(alpha, alpha); CutMix pastes the partner into a box (weight
0; 1 outside) and ``lam`` is the share of the image outside it; an
unmixed batch has weight 1 and ``lam`` 1.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class Mixing:
  """What to mix (the config's fields of the same meaning).

  Attributes:
    mixup_alpha: Mixup's Beta(alpha, alpha); 0: no Mixup.
    cutmix_alpha: CutMix's Beta(alpha, alpha); 0: no CutMix.
    mix_prob: the chance that a batch is mixed at all.
    switch_prob: the chance that CutMix rather than Mixup mixes a batch
      when both alphas are > 0.
    seed: the run's seed, from which every draw derives.
  """
  mixup_alpha: float
  cutmix_alpha: float
  mix_prob: float
  switch_prob: float
  seed: int


def from_config(config: ml_collections.ConfigDict) -> Mixing | None:
  """The config's mixing, or None when both alphas are 0 (off)."""
  if not config.mixup_alpha and not config.cutmix_alpha:
    return None
  return Mixing(mixup_alpha=config.mixup_alpha,
                cutmix_alpha=config.cutmix_alpha, mix_prob=config.mix_prob,
                switch_prob=config.mix_switch_prob, seed=config.seed)


def draw_key(seed: int, step, device, micro_batch) -> jax.Array:
  """The key of one batch's draw: (seed, step, device, micro-batch) folded
  in, in that order."""
  key = jax.random.key(seed)
  for value in (step, device, micro_batch):
    key = jax.random.fold_in(key, value)
  return key


def cutmix_weights(rng: jax.Array, height: int, width: int,
                   lam: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A CutMix box for a target weight of ``lam``.

  The box has sides floor(side x sqrt(1 - lam)) (an area fraction of about
  1 - lam), its centre uniform over the pixels; it is clipped to the image,
  and ``lam`` corrected to the share left outside it (timm's correct_lam).

  Returns:
    (the corrected lam, the [height, width] pixel weights: 0 in the box, 1
    outside).
  """
  cut = jnp.sqrt(1.0 - lam)
  inside = []
  for key, size in zip(jax.random.split(rng), (height, width)):
    length = jnp.floor(size * cut).astype(jnp.int32)
    start = jax.random.randint(key, (), 0, size) - length // 2
    positions = jnp.arange(size)
    inside.append((positions >= start) & (positions < start + length))
  box = inside[0][:, None] & inside[1][None, :]
  lam = 1.0 - jnp.sum(box) / (height * width)
  return lam, 1.0 - box.astype(jnp.float32)


def draw(rng: jax.Array, height: int, width: int,
         mixing: Mixing) -> tuple[jax.Array, jax.Array]:
  """One batch's draw: (lam, the [height, width] pixel weights)."""
  mix_key, switch_key, mixup_key, cutmix_key, box_key = jax.random.split(
      rng, 5)
  ones = jnp.ones((height, width), jnp.float32)
  draws = []  # Mixup's, then CutMix's.
  if mixing.mixup_alpha > 0:
    lam = jax.random.beta(mixup_key, mixing.mixup_alpha, mixing.mixup_alpha)
    draws.append((lam, lam * ones))
  if mixing.cutmix_alpha > 0:
    lam = jax.random.beta(cutmix_key, mixing.cutmix_alpha,
                          mixing.cutmix_alpha)
    draws.append(cutmix_weights(box_key, height, width, lam))
  lam, weights = draws[0]
  if len(draws) == 2:
    use_cutmix = jax.random.bernoulli(switch_key, mixing.switch_prob)
    lam, weights = jax.tree.map(
        lambda mixup, cutmix: jnp.where(use_cutmix, cutmix, mixup), *draws)
  mixed = jax.random.bernoulli(mix_key, mixing.mix_prob)
  return jnp.where(mixed, lam, 1.0), jnp.where(mixed, weights, ones)


def mix_images(images: jax.Array, weights: jax.Array) -> jax.Array:
  """w x image + (1 - w) x its partner, per pixel, in float32 and back to
  the images' dtype (exactly the image or the partner where w is 1 or 0).

  Args:
    images: [batch, height, width, channels].
    weights: [height, width], the weight w of the image itself.
  """
  x = images.astype(jnp.float32)
  w = weights[None, :, :, None]
  return (w * x + (1.0 - w) * x[::-1]).astype(images.dtype)


def mix_targets(targets: jax.Array, lam: jax.Array) -> jax.Array:
  """lam x each example's targets + (1 - lam) x its partner's."""
  return lam * targets + (1.0 - lam) * targets[::-1]


def dominant_labels(labels: jax.Array, lam: jax.Array) -> jax.Array:
  """Each example's label of the larger target weight (its own at lam >=
  0.5, else its partner's): what train top-1 counts as a hit."""
  return jnp.where(lam >= 0.5, labels, labels[::-1])


def mix(rng: jax.Array, images: jax.Array,
        mixing: Mixing) -> tuple[jax.Array, jax.Array]:
  """Mixes a batch of normalised [batch, height, width, channels] images by
  one draw; returns (the mixed images, lam)."""
  lam, weights = draw(rng, images.shape[1], images.shape[2], mixing)
  return mix_images(images, weights), lam
