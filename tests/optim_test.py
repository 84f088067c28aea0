"""Tests for darknet53_jax.optim."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def test_step_schedule_values():
  config = _config(learning_rate=0.1, lr_scaling='none', warmup_epochs=2,
                   num_epochs=10, lr_schedule='step', lr_step_epochs=(5, 8),
                   lr_step_decay=0.1)
  schedule = optim.create_learning_rate_schedule(config, 10)
  # Warm-up over steps 0-19, then 0.1 until the boundary steps 50 and 80.
  for step, rate in ((0, 0.005), (1, 0.01), (19, 0.1), (20, 0.1), (49, 0.1),
                     (50, 0.01), (79, 0.01), (80, 0.001), (99, 0.001),
                     (150, 0.001)):
    np.testing.assert_allclose(schedule(step), rate, rtol=1e-6,
                               err_msg=f'step {step}')


def test_step_schedule_without_boundaries_is_constant():
  config = _config(learning_rate=0.1, lr_scaling='none', warmup_epochs=1,
                   lr_schedule='step', lr_step_epochs=())
  schedule = optim.create_learning_rate_schedule(config, 10)
  np.testing.assert_allclose(jax.vmap(schedule)(jnp.arange(10, 1500)), 0.1)


def test_poly_schedule_values():
  config = _config(learning_rate=0.1, lr_scaling='none', warmup_epochs=1,
                   num_epochs=5, eta_min=0.001, lr_schedule='poly',
                   lr_poly_power=4.0)
  schedule = optim.create_learning_rate_schedule(config, 10)
  # Warm-up over steps 0-9; the decay counts the 40 steps 10-49.
  for step, rate in ((0, 0.01), (9, 0.1), (10, 0.1),
                     (30, 0.001 + 0.099 * 0.5**4),  # Halfway: 0.0071875.
                     (40, 0.001 + 0.099 * 0.25**4),
                     (49, 0.001 + 0.099 * (1 / 40)**4),
                     (50, 0.001), (60, 0.001)):
    np.testing.assert_allclose(schedule(step), rate, rtol=1e-6,
                               err_msg=f'step {step}')


def test_poly_schedule_without_warmup_is_darknets():
  """Darknet's policy=poly: lr * (1 - i / max_batches) ** power."""
  config = _config(learning_rate=0.1, lr_scaling='none', warmup_epochs=0,
                   num_epochs=8, eta_min=0.0, lr_schedule='poly',
                   lr_poly_power=4.0)
  schedule = optim.create_learning_rate_schedule(config, 100)
  steps = np.arange(800)
  np.testing.assert_allclose(jax.vmap(schedule)(steps),
                             0.1 * (1 - steps / 800)**4, rtol=1e-5,
                             atol=1e-12)


@pytest.mark.parametrize('key, value, message', [
    ('optimizer', 'adam', "config.optimizer='adam': use one of "
     "('sgd', 'adamw', 'lamb', 'lars')."),
    ('lr_schedule', 'linear', "config.lr_schedule='linear': use one of "
     "('cosine', 'step', 'poly')."),
    ('lr_poly_power', 0.0, 'config.lr_poly_power=0.0: use a value > 0.'),
    ('lr_step_decay', 0.0, 'config.lr_step_decay=0.0: use a factor in (0, 1]'),
    ('lr_step_decay', 2.0, 'config.lr_step_decay=2.0: use a factor in (0, 1]'),
    ('lr_step_epochs', (60, 30), 'config.lr_step_epochs=(60, 30): use '
     'positive epochs in increasing order.'),
    ('lr_step_epochs', (0, 30), 'config.lr_step_epochs=(0, 30): use '
     'positive epochs in increasing order.'),
    ('lr_step_epochs', (30, 30), 'config.lr_step_epochs=(30, 30): use '
     'positive epochs in increasing order.'),
    ('adam_b2', 1.0, 'config.adam_b2=1.0: use a value in [0, 1).'),
    ('adam_eps', 0.0, 'config.adam_eps=0.0: use a value > 0.'),
    ('lars_trust_coefficient', -0.001,
     'config.lars_trust_coefficient=-0.001: use a value > 0.'),
    ('momentum', 1.0, 'config.momentum=1.0: use a value in [0, 1).'),
    ('weight_decay', -1e-4, 'config.weight_decay=-0.0001: use a value >= 0.'),
])
def test_optimizer_values_that_cannot_work(key, value, message):
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(_config(**{key: value}), 1, 1)
  assert str(error.value).startswith(message)
  assert '\n' not in str(error.value)


def test_step_epochs_must_fall_within_the_run_under_the_step_schedule():
  config = _config(num_epochs=60, lr_step_epochs=(30, 60))
  config_lib.validate(config, 1, 1)  # Unused by the cosine.
  config.lr_schedule = 'step'
  with pytest.raises(config_lib.ConfigError,
                     match=r'lr_step_epochs=\(30, 60\): with '
                     'config.num_epochs=60'):
    config_lib.validate(config, 1, 1)


# The optimisers' settings in the tests below, none of them the default.
_SETTINGS = dict(weight_decay=0.05, momentum=0.8, adam_b1=0.85, adam_b2=0.99,
                 adam_eps=1e-6, lars_trust_coefficient=0.02)


def _tiny_params(head=False):
  """A conv kernel and a BatchNorm scale and bias, named as the model's
  modules (and a head, if asked)."""
  params = {'Conv_0': {'kernel': jnp.linspace(-1., 1., 18).reshape(3, 3, 1,
                                                                   2)},
            'BatchNorm_0': {'scale': jnp.array([1.0, 0.5]),
                            'bias': jnp.array([0.25, -0.5])}}
  if head:
    params['head'] = {'kernel': jnp.full((2, 3), 0.5),
                      'bias': jnp.array([0.1, 0.0, -0.1])}
  return params


def _varying_rate(step):
  return 0.1 / (1.0 + step)


def _run(tx, params, num_steps=3):
  """Each step's updates under ``tx`` from fixed pseudo-random gradients,
  and the params after them."""
  leaves, treedef = jax.tree.flatten(params)
  state = tx.init(params)
  history = []
  for step in range(num_steps):
    keys = jax.random.split(jax.random.key(step), len(leaves))
    grads = treedef.unflatten([jax.random.normal(key, leaf.shape)
                               for key, leaf in zip(keys, leaves)])
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(updates)
  return history, params


def _assert_trees_close(actual, expected, rtol=1e-6):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=rtol,
                                                       atol=1e-9),
               actual, expected)


# The model's weight-decay mask for ``_tiny_params``, written out.
_KERNELS_ONLY = {'Conv_0': {'kernel': True},
                 'BatchNorm_0': {'scale': False, 'bias': False}}


def _kernel_from(first, second):
  """``first``'s conv kernel with ``second``'s BatchNorm leaves."""
  return {'Conv_0': first['Conv_0'], 'BatchNorm_0': second['BatchNorm_0']}


def test_optimizers_equal_optax_references():
  s = _SETTINGS
  references = {
      'sgd': optax.chain(
          optax.add_decayed_weights(s['weight_decay'], _KERNELS_ONLY),
          optax.sgd(_varying_rate, momentum=s['momentum'])),
      'adamw': optax.adamw(_varying_rate, b1=s['adam_b1'], b2=s['adam_b2'],
                           eps=s['adam_eps'], weight_decay=s['weight_decay'],
                           mask=_KERNELS_ONLY),
      'lars': optax.lars(_varying_rate, weight_decay=s['weight_decay'],
                         weight_decay_mask=_KERNELS_ONLY,
                         trust_coefficient=s['lars_trust_coefficient'],
                         trust_ratio_mask=_KERNELS_ONLY,
                         momentum=s['momentum'])}
  params = _tiny_params()
  for name, reference in references.items():
    tx = optim.create_optimizer(_config(optimizer=name, **_SETTINGS),
                                _varying_rate)
    _assert_trees_close(_run(tx, params)[0], _run(reference, params)[0])
  # LAMB: optax.lamb on the kernel; Adam (no decay, no trust ratio) on the
  # exempt BatchNorm leaves.
  lamb = optax.lamb(_varying_rate, b1=s['adam_b1'], b2=s['adam_b2'],
                    eps=s['adam_eps'], weight_decay=s['weight_decay'],
                    mask=_KERNELS_ONLY)
  adam = optax.adam(_varying_rate, b1=s['adam_b1'], b2=s['adam_b2'],
                    eps=s['adam_eps'])
  expected = map(_kernel_from, _run(lamb, params)[0], _run(adam, params)[0])
  tx = optim.create_optimizer(_config(optimizer='lamb', **_SETTINGS),
                              _varying_rate)
  for actual, reference in zip(_run(tx, params)[0], expected):
    _assert_trees_close(actual, reference)


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_exempt_leaves_get_the_plain_rule(name):
  """Decay (and LAMB's and LARS's trust ratio) reach the kernel only: the
  BatchNorm leaves move as under plain momentum SGD or Adam."""
  s = _SETTINGS
  plain = (optax.sgd(0.1, momentum=s['momentum'])
           if name in ('sgd', 'lars') else
           optax.adam(0.1, b1=s['adam_b1'], b2=s['adam_b2'],
                      eps=s['adam_eps']))
  tx = optim.create_optimizer(_config(optimizer=name, **_SETTINGS),
                              lambda _: 0.1)
  actual, _ = _run(tx, _tiny_params())
  expected, _ = _run(plain, _tiny_params())
  for step_actual, step_expected in zip(actual, expected):
    _assert_trees_close(step_actual['BatchNorm_0'],
                        step_expected['BatchNorm_0'])
    assert not np.allclose(step_actual['Conv_0']['kernel'],
                           step_expected['Conv_0']['kernel'], rtol=1e-3)


def test_default_sgd_is_todays_chain_bitwise():
  config = _config()
  schedule = optim.create_learning_rate_schedule(config, 10)
  todays = optax.chain(
      optax.add_decayed_weights(config.weight_decay,
                                mask=optim.weight_decay_mask),
      optax.sgd(schedule, momentum=config.momentum,
                nesterov=config.nesterov))
  tx = optim.create_optimizer(config, schedule)
  params = _tiny_params(head=True)
  assert (jax.tree.structure(tx.init(params)) ==
          jax.tree.structure(todays.init(params)))
  (actual, actual_params), (expected, expected_params) = (
      _run(tx, params), _run(todays, params))
  jax.tree.map(np.testing.assert_array_equal, (actual, actual_params),
               (expected, expected_params))


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_frozen_backbone_stays_under_every_optimizer(name):
  params = _tiny_params(head=True)
  tx = optim.create_optimizer(
      _config(optimizer=name, freeze_backbone=True, **_SETTINGS),
      _varying_rate)
  _, trained = _run(tx, params)
  for module in ('Conv_0', 'BatchNorm_0'):
    jax.tree.map(np.testing.assert_array_equal, trained[module],
                 params[module])
  assert not np.allclose(trained['head']['kernel'], params['head']['kernel'])


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_backbone_multiplier_scales_every_optimizers_step(name):
  params = _tiny_params(head=True)

  def first_updates(multiplier):
    config = _config(optimizer=name, backbone_lr_multiplier=multiplier,
                     **_SETTINGS)
    history, _ = _run(optim.create_optimizer(config, _varying_rate), params,
                      num_steps=1)
    return history[0]

  full, scaled = first_updates(1.0), first_updates(0.1)
  _assert_trees_close(scaled['head'], full['head'])
  for module in ('Conv_0', 'BatchNorm_0'):
    _assert_trees_close(scaled[module],
                        jax.tree.map(lambda x: 0.1 * x, full[module]),
                        rtol=1e-5)


def test_label_smoothing_matches_reference():
  targets = optim.smoothed_one_hot(jnp.array([2]), 5, 0.1)
  np.testing.assert_allclose(targets, [[0.025, 0.025, 0.9, 0.025, 0.025]],
                             rtol=1e-6)
  logits = jnp.log(targets)
  loss = optim.cross_entropy(logits, jnp.array([2]), 0.1)
  entropy = -jnp.sum(targets * jnp.log(targets))
  np.testing.assert_allclose(loss, [entropy], rtol=1e-5)
