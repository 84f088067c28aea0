"""Tests for darknet53_jax.mixing: Mixup and CutMix draws, images and
targets (the train step's use of them: train_test.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from darknet53_jax import mixing
from darknet53_jax import optim
from tests import conftest

MIXUP = mixing.Mixing(mixup_alpha=0.8, cutmix_alpha=0.0, mix_prob=1.0,
                      switch_prob=0.5, seed=0)
CUTMIX = mixing.Mixing(mixup_alpha=0.0, cutmix_alpha=1.0, mix_prob=1.0,
                       switch_prob=0.5, seed=0)
BOTH = mixing.Mixing(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0,
                     switch_prob=0.5, seed=0)


def _images(batch=6, height=32, width=48, seed=0):
  return np.random.default_rng(seed).normal(
      size=(batch, height, width, 3)).astype(np.float32)


def _keys(count, seed=0):
  return jax.random.split(jax.random.key(seed), count)


# Jitted: one compile each, not one per operation and call.
_mix = jax.jit(mixing.mix, static_argnums=2)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draws(keys, height, width, mix):
  return jax.vmap(lambda k: mixing.draw(k, height, width, mix))(keys)


def test_from_config_is_none_when_both_alphas_are_zero():
  config = conftest.tiny_config()
  assert mixing.from_config(config) is None
  config.update(cutmix_alpha=1.0, mix_prob=0.7, mix_switch_prob=0.2, seed=3)
  assert mixing.from_config(config) == mixing.Mixing(
      mixup_alpha=0.0, cutmix_alpha=1.0, mix_prob=0.7, switch_prob=0.2,
      seed=3)


def test_targets_sum_to_one_and_weigh_smoothed_one_hots():
  labels = np.array([0, 3, 3, 9, 1])
  num_classes, smoothing, lam = 10, 0.1, 0.3
  targets = np.asarray(mixing.mix_targets(
      optim.smoothed_one_hot(labels, num_classes, smoothing), lam))
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  one_hots = np.eye(num_classes)
  smoothed = one_hots * (1 - smoothing) + (1 - one_hots) * smoothing / 9
  want = lam * smoothed[labels] + (1 - lam) * smoothed[labels[::-1]]
  np.testing.assert_allclose(targets, want, rtol=1e-6)


def test_top1_counts_the_label_of_the_larger_weight():
  labels = jnp.array([4, 5, 6])
  np.testing.assert_array_equal(mixing.dominant_labels(labels, 0.7), labels)
  np.testing.assert_array_equal(mixing.dominant_labels(labels, 0.5), labels)
  np.testing.assert_array_equal(mixing.dominant_labels(labels, 0.3),
                                [6, 5, 4])


def test_mixup_blends_each_image_with_the_reversed_batch():
  x = _images()
  for key in _keys(3):
    mixed, lam = _mix(key, jnp.asarray(x), MIXUP)
    lam = float(lam)
    assert 0 < lam < 1
    np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1],
                               rtol=1e-5, atol=1e-6)


def test_mixup_keeps_the_images_dtype():
  x = jnp.asarray(_images(), jnp.bfloat16)
  assert _mix(_keys(1)[0], x, MIXUP)[0].dtype == jnp.bfloat16


@pytest.mark.parametrize('lam', [0.1, 0.5, 0.9])
def test_cutmix_box_has_the_area_of_one_minus_lam_unless_clipped(lam):
  height, width = 32, 48
  lams, weights = jax.jit(jax.vmap(
      lambda k: mixing.cutmix_weights(k, height, width, lam)))(_keys(200))
  side = np.floor(np.array([height, width]) * np.sqrt(1 - lam))
  unclipped = 0
  for corrected, w in zip(np.asarray(lams), np.asarray(weights)):
    assert set(np.unique(w)) <= {0.0, 1.0}
    box = w == 0
    rows, cols = box.any(1), box.any(0)
    np.testing.assert_array_equal(box, np.outer(rows, cols))  # A rectangle.
    for inside, length in ((rows, side[0]), (cols, side[1])):
      where = np.flatnonzero(inside)
      assert np.all(np.diff(where) == 1)  # Contiguous.
      touches_border = where[0] == 0 or where[-1] == len(inside) - 1
      assert len(where) == length or (touches_border and len(where) < length)
    unclipped += box.sum() == side.prod()
    # timm's correct_lam: lam is the share outside the (clipped) box.
    assert corrected == pytest.approx(1 - box.sum() / (height * width),
                                      abs=1e-7)
  # A centre uniform over the pixels keeps a side of length n whole at
  # size - n + 1 of its size positions.
  whole = np.prod((np.array([height, width]) - side + 1) /
                  np.array([height, width]))
  assert unclipped / 200 == pytest.approx(whole, abs=0.1)
  assert abs(side.prod() / (height * width) - (1 - lam)) < 0.07


def test_cutmix_pastes_the_partner_into_the_box_exactly():
  x = _images()
  for key in _keys(5):
    mixed, lam = _mix(key, jnp.asarray(x), CUTMIX)
    mixed = np.asarray(mixed)
    box = np.all(mixed == x[::-1], axis=-1)
    np.testing.assert_array_equal(box, box[:1].repeat(len(x), 0))
    np.testing.assert_array_equal(mixed, np.where(box[..., None], x[::-1], x))
    assert float(lam) == pytest.approx(1 - box[0].mean(), abs=1e-7)


def test_draws_are_a_function_of_seed_step_device_and_micro_batch():
  def lam(seed, step, device, micro):
    return mixing.draw(mixing.draw_key(seed, step, device, micro), 8, 8,
                       BOTH)[0]

  jitted = jax.jit(lam, static_argnums=0)
  base = float(jitted(0, 5, 1, 0))
  assert float(jitted(0, 5, 1, 0)) == base
  # Traced int32 step, device and micro-batch, as in the train step.
  traced = jax.jit(functools.partial(lam, 0))
  assert float(traced(jnp.int32(5), jnp.int32(1), jnp.int32(0))) == base
  for other in ((1, 5, 1, 0), (0, 6, 1, 0), (0, 5, 0, 0), (0, 5, 1, 1)):
    assert float(jitted(*other)) != base, other


def test_mix_prob_zero_leaves_the_batch_alone():
  off = mixing.Mixing(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.0,
                      switch_prob=0.5, seed=0)
  x = jnp.asarray(_images(), jnp.float16)
  targets = optim.smoothed_one_hot(jnp.arange(6), 10, 0.1)
  for key in _keys(5):
    mixed, lam = _mix(key, x, off)
    assert mixed.dtype == x.dtype
    np.testing.assert_array_equal(mixed, x)
    assert float(lam) == 1.0
    np.testing.assert_array_equal(mixing.mix_targets(targets, lam), targets)


def test_mix_prob_and_switch_prob_are_the_chances_of_mixing_and_cutmix():
  half = mixing.Mixing(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.5,
                       switch_prob=0.25, seed=0)
  lams, weights = map(np.asarray, _draws(_keys(2000), 8, 8, half))
  mixed = np.any(weights != 1, axis=(1, 2))
  np.testing.assert_array_equal(mixed, lams < 1)
  # A CutMix box's weights are 0 and 1; Mixup's are lam everywhere.
  cutmix = mixed & np.any(weights == 0, axis=(1, 2))
  assert mixed.mean() == pytest.approx(0.5, abs=0.04)
  assert cutmix.sum() / mixed.sum() == pytest.approx(0.25, abs=0.04)
  mixup = mixed & ~cutmix
  np.testing.assert_array_equal(weights[mixup], np.broadcast_to(
      lams[mixup, None, None], weights[mixup].shape))


@pytest.mark.parametrize('alpha', [0.2, 1.0])
def test_mixup_lam_follows_beta_alpha_alpha(alpha):
  mixup = mixing.Mixing(mixup_alpha=alpha, cutmix_alpha=0.0, mix_prob=1.0,
                        switch_prob=0.5, seed=0)
  lams = np.asarray(_draws(_keys(2000), 8, 8, mixup)[0])
  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
  assert lams.mean() == pytest.approx(0.5, abs=0.03)
  assert lams.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)
