"""Tests for darknet53_jax.optim."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from darknet53_jax import config_defaults
from darknet53_jax import config_lib
from darknet53_jax import optim


def _config(**overrides):
  config = config_defaults.get_config()
  config.update(overrides)
  return config


def test_schedule_values():
  config = _config(batch_size=512, learning_rate=0.1, warmup_epochs=5,
                   num_epochs=150, eta_min=0.0)
  steps_per_epoch = 100
  schedule = optim.create_learning_rate_schedule(config, steps_per_epoch)
  peak = 0.2  # 0.1 * 512 / 256.
  warmup, total = 500, 15_000
  np.testing.assert_allclose(schedule(0), peak / warmup, rtol=1e-6)
  np.testing.assert_allclose(schedule(warmup - 1), peak, rtol=1e-6)
  np.testing.assert_allclose(schedule(warmup), peak, rtol=1e-6)
  np.testing.assert_allclose(schedule(warmup + (total - warmup) // 2),
                             peak / 2, rtol=1e-5)
  last = peak * 0.5 * (1 + np.cos(np.pi * (total - 1 - warmup) /
                                  (total - warmup)))
  np.testing.assert_allclose(schedule(total - 1), last, atol=1e-8)
  np.testing.assert_allclose(schedule(total - 100), peak * 0.5 * (
      1 + np.cos(np.pi * (total - 100 - warmup) / (total - warmup))),
                             rtol=1e-3)


def test_per_epoch_cosine_is_the_references():
  """MindSpore's warmup_cosine_annealing_lr: cos(pi * epoch / T_max) from
  epoch 0, T_max = num_epochs, constant within an epoch."""
  config = _config(learning_rate=0.1, lr_scaling='none', warmup_epochs=5,
                   num_epochs=150, eta_min=0.001,
                   cosine_schedule='per_epoch_from_epoch0')
  steps_per_epoch = 10
  schedule = optim.create_learning_rate_schedule(config, steps_per_epoch)
  peak, eta_min = 0.1, 0.001

  def cosine(epoch):
    return eta_min + (peak - eta_min) * (1 + np.cos(np.pi * epoch / 150)) / 2

  np.testing.assert_allclose(schedule(0), peak / 50, rtol=1e-6)
  np.testing.assert_allclose(schedule(49), peak, rtol=1e-6)
  # The first step after warm-up is already 5 epochs down the cosine, and
  # every step of an epoch shares its rate.
  for step in range(50, 60):
    np.testing.assert_allclose(schedule(step), cosine(5), rtol=1e-6)
  np.testing.assert_allclose(schedule(60), cosine(6), rtol=1e-6)
  np.testing.assert_allclose(schedule(1499), cosine(149), rtol=1e-5)
  reference = [peak * (i + 1) / 50 if i < 50 else cosine(i // 10)
               for i in range(1500)]
  np.testing.assert_allclose(jax.vmap(schedule)(jnp.arange(1500)), reference,
                             rtol=1e-5)


def test_schedule_decays_to_eta_min():
  config = _config(eta_min=0.01, num_epochs=10, warmup_epochs=1)
  schedule = optim.create_learning_rate_schedule(config, 10)
  np.testing.assert_allclose(schedule(100), 0.01, rtol=1e-6)


def test_lr_scaling_rules():
  assert optim.peak_learning_rate(_config(batch_size=2048)) == pytest.approx(
      0.8)
  assert optim.peak_learning_rate(
      _config(batch_size=2048, lr_scaling='none')) == pytest.approx(0.1)
  with pytest.raises(config_lib.ConfigError, match='lr_scaling'):
    config_lib.validate(_config(lr_scaling='sqrt'), 1, 1)


def test_weight_decay_only_on_kernels():
  params = {'conv': {'kernel': jnp.ones((3, 3, 2, 2))},
            'bn': {'scale': jnp.ones(2), 'bias': jnp.ones(2)},
            'head': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}}
  config = _config(weight_decay=0.5, momentum=0.0)
  tx = optim.create_optimizer(config, lambda _: 1.0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # Only kernels move: update = -lr * wd * param.
  np.testing.assert_allclose(updates['conv']['kernel'], -0.5)
  np.testing.assert_allclose(updates['head']['kernel'], -0.5)
  for leaf in (updates['bn']['scale'], updates['bn']['bias'],
               updates['head']['bias']):
    np.testing.assert_allclose(leaf, 0.0)


def _fine_tune_updates(**overrides):
  """One step's updates of a stem and a head under ``overrides``, from
  gradients of ones, with weight decay 0.5 and the learning rate 1."""
  params = {'stem': {'kernel': jnp.ones((3, 3, 2, 2)), 'scale': jnp.ones(2)},
            'head': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}}
  tx = optim.create_optimizer(_config(weight_decay=0.5, **overrides),
                              lambda _: 1.0)
  grads = jax.tree.map(jnp.ones_like, params)
  return tx.update(grads, tx.init(params), params)


def test_backbone_learns_at_its_multiplier_of_the_rate():
  updates, _ = _fine_tune_updates(backbone_lr_multiplier=0.1)
  # -lr * (grad + decay * param) for kernels, -lr * grad otherwise.
  np.testing.assert_allclose(updates['stem']['kernel'], -0.15, rtol=1e-6)
  np.testing.assert_allclose(updates['stem']['scale'], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates['head']['kernel'], -1.5)
  np.testing.assert_allclose(updates['head']['bias'], -1.0)


def test_frozen_backbone_gets_no_update_decay_or_momentum():
  updates, state = _fine_tune_updates(freeze_backbone=True,
                                      backbone_lr_multiplier=0.1)
  for leaf in jax.tree.leaves(updates['stem']):
    np.testing.assert_array_equal(leaf, 0.0)
  np.testing.assert_allclose(updates['head']['kernel'], -1.5)
  # Momentum is kept for the head's 6 + 3 values only (and a step count).
  assert sorted(x.size for x in jax.tree.leaves(state)) == [1, 3, 6]


def test_backbone_lr_multiplier_is_not_negative():
  with pytest.raises(config_lib.ConfigError,
                     match='backbone_lr_multiplier=-1.0: use a value >= 0'):
    config_lib.validate(_config(backbone_lr_multiplier=-1.0), 1, 1)


def test_label_smoothing_matches_reference():
  targets = optim.smoothed_one_hot(jnp.array([2]), 5, 0.1)
  np.testing.assert_allclose(targets, [[0.025, 0.025, 0.9, 0.025, 0.025]],
                             rtol=1e-6)
  logits = jnp.log(targets)
  loss = optim.cross_entropy(logits, jnp.array([2]), 0.1)
  entropy = -jnp.sum(targets * jnp.log(targets))
  np.testing.assert_allclose(loss, [entropy], rtol=1e-5)
