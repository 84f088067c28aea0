"""Tests for darknet53_jax.steps and .precision: sharded steps, loss
scaling, exact eval, gradient accumulation and mixing in the step.

The multi-device checks run this file as a module in a subprocess with 8
forced CPU devices (XLA reads the device count once, at start-up).
"""

import json
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax.training import dynamic_scale as dynamic_scale_lib

from darknet53_jax import build
from darknet53_jax import mixing
from darknet53_jax import precision
from darknet53_jax import optim
from darknet53_jax import sharding
from darknet53_jax import steps
from tests import conftest


def multidevice_checks(data_dir: str) -> dict:
  """Runs with 8 devices; returns the numbers the tests assert on."""
  from darknet53_jax.datasets import registry  # pylint: disable=g-import-not-at-top
  from darknet53_jax import train_loop  # pylint: disable=g-import-not-at-top
  config = conftest.tiny_config(data_dir)
  config.batch_size = 16
  # 2x2 final maps: BatchNorm normalises 64 values per channel, not 16.
  config.train_size = 64
  config.label_smoothing = 0.1
  batches = conftest.random_batches(config, 3)
  devices = jax.devices()
  on_eight = conftest.train_steps(config, devices, batches)
  on_one = conftest.train_steps(config, devices[:1], batches)

  mesh, run = conftest.train_setup(config, devices)
  builder = registry.get_builder(config)
  metrics = train_loop.evaluate(run.state, run.eval_step, mesh, builder,
                                config, 'test[:37]')
  return {'devices': len(devices),
          'max_relative_difference': conftest.max_relative_difference(
              on_eight, on_one),
          'eval_num_examples': metrics['num_examples']}


def _train(config, devices, batches):
  """(params and BatchNorm statistics, losses) after a step per batch, and
  the initial variables."""
  mesh, run = conftest.train_setup(config, devices)
  state = run.state
  initial = jax.device_get({'params': state.params,
                            'batch_stats': state.batch_stats})
  losses = []
  for batch in batches:
    state, metrics = run.train_step(state, sharding.global_batch(mesh, batch))
    losses.append(float(metrics['loss']))
  return jax.device_get({'params': state.params,
                         'batch_stats': state.batch_stats}), losses, initial


def _mixed_loss_function(config):
  """A jitted (variables, batch, key) -> (loss, lam): the loss that
  ``config``'s mixing by the draw of ``key`` gives a frozen-backbone model
  on ``batch``."""
  model = build.create_model(config)
  normalize = steps.image_normalizer(config)
  mix = mixing.from_config(config)

  def mixed_loss(variables, batch, key):
    images, lam = mixing.mix(key, normalize(batch['image']), mix)
    logits = model.apply(variables, images)
    targets = mixing.mix_targets(optim.smoothed_one_hot(
        batch['label'], logits.shape[-1], config.label_smoothing), lam)
    return optax.softmax_cross_entropy(logits, targets).mean(), lam

  return jax.jit(mixed_loss)


def accumulation_and_mixing_checks() -> dict:
  """Runs with at least 4 devices; returns the numbers the tests assert
  on."""
  config = conftest.tiny_config()
  config.batch_size = 16
  # 2x2 final maps: BatchNorm normalises 16 values per channel in each
  # micro-batch; over 4 (1x1 maps at 32 px) it amplifies the rounding of
  # the second step to 3e-4.
  config.train_size = 64
  config.label_smoothing = 0.1
  config.sync_batch_norm = False
  batches = conftest.random_batches(config, 2)
  devices = jax.devices()
  on_four, four_losses, _ = _train(config, devices[:4], batches)
  config.accumulation_steps = 4
  accumulated, accumulated_losses, _ = _train(config, devices[:1], batches)
  results = {
      'accumulated_vs_four_devices': conftest.max_relative_difference(
          accumulated, on_four),
      'losses': [accumulated_losses, four_losses]}

  # Mixing on 2 devices, each slice (each micro-batch) by its own draw; with
  # a frozen backbone the loss is a per-device function of the draws.
  config.update(batch_size=8, train_size=32, freeze_backbone=True,
                mixup_alpha=1.0, cutmix_alpha=1.0)
  batch = conftest.random_batches(config, 1)[0]
  for count in (1, 2):
    config.accumulation_steps = count
    _, (loss,), variables = _train(config, devices[:2], [batch])
    size = config.batch_size // (2 * count)  # In device, then micro order.
    slices = [jax.tree.map(lambda x, i=i: x[i * size:(i + 1) * size], batch)
              for i in range(2 * count)]
    mixed_loss = _mixed_loss_function(config)
    draw = lambda i: mixing.draw_key(config.seed, 0, *divmod(i, count))
    # Each slice by its (step 0, device, micro-batch) draw, and all by one.
    draws = [mixed_loss(variables, slices[i], draw(i))
             for i in range(2 * count)]
    same_draw = [mixed_loss(variables, slices[i], draw(0))[0]
                 for i in range(2 * count)]
    results[f'mixed_{count}'] = {
        'loss': loss, 'lams': [float(lam) for _, lam in draws],
        'expected': float(np.mean([loss for loss, _ in draws])),
        'one_draw': float(np.mean(same_draw))}
  return results


def all_multidevice_checks(data_dir: str) -> dict:
  """Both checks' numbers, by name."""
  return {'multidevice': multidevice_checks(data_dir),
          'accumulation_and_mixing': accumulation_and_mixing_checks()}


@pytest.fixture(scope='module')
def multidevice_results(digits_data_dir):
  """``all_multidevice_checks``, run in one subprocess with 8 forced CPU
  devices."""
  result = subprocess.run(
      [sys.executable, '-m', 'tests.train_test', digits_data_dir],
      env=conftest.subprocess_env(devices=8), cwd=conftest.REPO,
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def eight_device_results(multidevice_results):
  return multidevice_results['multidevice']


@pytest.fixture(scope='module')
def accumulation_and_mixing_results(multidevice_results):
  return multidevice_results['accumulation_and_mixing']


def test_eight_devices_match_one_device(eight_device_results):
  # Only the reduction order differs. Measured 1.6e-6 after 3 steps here
  # (AMD EPYC); at 32 px (1x1 final maps) BatchNorm amplified it to 2.9e-6.
  assert eight_device_results['devices'] == 8
  assert eight_device_results['max_relative_difference'] < 1e-5


def test_eval_counts_every_example_once_on_eight_devices(eight_device_results):
  # 37 examples, global batch 16 over 8 devices: 3 batches, 11 padded.
  assert eight_device_results['eval_num_examples'] == 37


def _fp16_config():
  config = conftest.tiny_config()
  config.dtype = 'float16'
  config.batch_size = 4
  config.loss_scale = 1024.0
  config.loss_scale_growth_interval = 2
  return config


def test_non_finite_step_changes_nothing_and_halves_scale():
  config = _fp16_config()
  mesh, run = conftest.train_setup(config, jax.devices()[:1])
  step = run.train_step
  first = conftest.random_batches(config, 1)[0]
  state, _ = step(run.state, sharding.global_batch(mesh, first))
  before = jax.device_get(state)
  bad = conftest.random_batches(config, 1, seed=1)[0]
  bad['color_jitter'] = np.ones((config.batch_size, 3), np.float32)
  bad['color_jitter'][0, 0] = np.nan  # A NaN image.
  state, metrics = step(state, sharding.global_batch(mesh, bad))
  after = jax.device_get(state)
  assert float(metrics['finite']) == 0.0
  for name in ('params', 'batch_stats', 'opt_state'):
    conftest.assert_trees_equal(getattr(after, name), getattr(before, name))
  assert float(after.dynamic_scale.scale) == 512.0
  assert int(after.step) == int(before.step) + 1


def _loss_scales(config, steps: int = 4) -> list[float]:
  """The loss scale after each of ``steps`` finite steps."""
  mesh, run = conftest.train_setup(config, jax.devices()[:1])
  state, scales = run.state, []
  for batch in conftest.random_batches(config, steps):
    state, metrics = run.train_step(state, sharding.global_batch(mesh, batch))
    assert float(metrics['finite']) == 1.0
    scales.append(float(metrics['loss_scale']))
  return scales


def test_loss_scale_doubles_after_growth_interval_finite_steps():
  # growth_interval=2: two finite steps at 1024, the third doubles it.
  assert _loss_scales(_fp16_config()) == [1024.0, 1024.0, 2048.0, 2048.0]


def test_fixed_loss_scale_stays_put():
  config = _fp16_config()
  config.loss_scale_mode = 'fixed'
  assert _loss_scales(config) == [1024.0] * 4


def test_fixed_scale_applies_an_overflowing_step_as_the_reference():
  """MindSpore's FixedLossScaleManager(drop_overflow_update=False) runs the
  optimiser on whatever the gradients hold; so does ours, and says so."""
  config = _fp16_config()
  config.loss_scale_mode = 'fixed'
  config.skip_nonfinite_updates = False
  # d loss / d logits is up to 2^20 / batch 4 = 2.6e5: past float16's
  # 65504 on its way back through the float16 head, while the forward pass
  # stays finite.
  config.loss_scale = 2.0 ** 20
  mesh, run = conftest.train_setup(config, jax.devices()[:1])
  before = jax.device_get(run.state)
  batch = conftest.random_batches(config, 1)[0]
  state, metrics = run.train_step(run.state,
                                  sharding.global_batch(mesh, batch))
  after = jax.device_get(state)
  assert float(metrics['finite']) == 0.0
  assert np.isfinite(float(metrics['loss']))
  assert int(after.step) == 1
  assert float(after.dynamic_scale.scale) == 2.0 ** 20
  # The forward pass's statistics are finite and taken; the non-finite
  # gradients reach the momentum and the parameters.
  stats = jax.tree.leaves(after.batch_stats)
  assert all(np.isfinite(x).all() for x in stats)
  assert conftest.max_relative_difference(after.batch_stats,
                                          before.batch_stats) > 0
  for tree in (after.params, after.opt_state):
    assert not all(np.isfinite(x).all() for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('dtype, mode, skip, stops', [
    ('float16', 'dynamic', True, False),  # The scale backs off: it recovers.
    ('float16', 'fixed', True, True),
    ('float16', 'fixed', False, True),
    ('float32', 'dynamic', True, True),
    ('bfloat16', 'dynamic', False, True),
])
def test_a_run_of_nonfinite_steps_stops_unless_the_scale_backs_off(
    dtype, mode, skip, stops):
  config = conftest.tiny_config()
  config.update(dtype=dtype, loss_scale_mode=mode, skip_nonfinite_updates=skip,
                max_consecutive_nonfinite_steps=3)
  assert precision.count_nonfinite_run([1.0, 0.0], 0, 2, config) == 1
  if not stops:
    assert precision.count_nonfinite_run([0.0] * 5, 1, 7, config) == 6
    return
  kept = 'last good state' if skip else 'may hold non-finite values'
  with pytest.raises(precision.DivergedError, match=kept):
    precision.count_nonfinite_run([0.0, 0.0], 1, 4, config)


def test_float16_step_trains():
  config = _fp16_config()
  mesh, run = conftest.train_setup(config, jax.devices()[:1])
  initial = jax.device_get(run.state.params)
  batch = conftest.random_batches(config, 1)[0]
  state, metrics = run.train_step(run.state,
                                  sharding.global_batch(mesh, batch))
  assert np.isfinite(float(metrics['loss']))
  assert conftest.max_relative_difference(jax.device_get(state.params),
                                          initial) > 0


def test_frozen_backbone_trains_the_head_on_running_statistics():
  config = conftest.tiny_config()
  config.freeze_backbone = True
  config.batch_size = 8
  mesh, run = conftest.train_setup(config, jax.devices()[:1])
  before = jax.device_get({'params': run.state.params,
                           'batch_stats': run.state.batch_stats})
  batch = conftest.random_batches(config, 1)[0]
  state, metrics = run.train_step(run.state,
                                  sharding.global_batch(mesh, batch))
  after = jax.device_get({'params': state.params,
                          'batch_stats': state.batch_stats})
  head_before = before['params'].pop('head')
  head_after = after['params'].pop('head')
  conftest.assert_trees_equal(after, before)  # Weight decay included.
  assert conftest.max_relative_difference(head_after, head_before) > 0
  # The step's forward pass is the eval-mode one.
  logits = jax.jit(run.model.apply)(
      {**before, 'params': {**before['params'], 'head': head_before}},
      steps.image_normalizer(config)(batch['image']))
  loss = optim.cross_entropy(logits, batch['label'],
                             config.label_smoothing).mean()
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)


def test_loss_scale_rule_for_accumulated_gradients_is_flaxs():
  for fin_steps in (0, 2):
    for finite in (True, False):
      scale = dynamic_scale_lib.DynamicScale(
          growth_interval=2, fin_steps=fin_steps, minimum_scale=600.0,
          scale=jax.numpy.float32(1024.0))
      gradient = 1.0 if finite else np.inf
      want, *_ = scale.value_and_grad(lambda p, g=gradient: p * g)(1.0)
      got = precision.update_loss_scale(scale, jax.numpy.asarray(finite))
      assert (float(got.scale), int(got.fin_steps)) == (
          float(want.scale), int(want.fin_steps)), (fin_steps, finite)


def test_accumulated_frozen_backbone_step_equals_one_on_the_full_batch():
  # Eval-mode BatchNorm: each example's loss is independent of the others',
  # so 4 micro-batches of 4 compute what one batch of 16 does.
  config = conftest.tiny_config()
  config.update(batch_size=16, freeze_backbone=True, label_smoothing=0.1)
  batches = conftest.random_batches(config, 2)
  whole, whole_losses, initial = _train(config, jax.devices()[:1], batches)
  config.accumulation_steps = 4
  accumulated, losses, _ = _train(config, jax.devices()[:1], batches)
  conftest.assert_trees_equal(accumulated['batch_stats'],
                              initial['batch_stats'])
  assert conftest.max_relative_difference(accumulated, whole) < 1e-5
  assert conftest.max_relative_difference(accumulated, initial) > 1e-3
  np.testing.assert_allclose(losses, whole_losses, rtol=1e-6)


def test_accumulated_float16_steps_scale_and_skip_as_one_step():
  config = _fp16_config()
  # Micro-batches of 4, as _fp16_config's batch: BatchNorm over 2 values per
  # channel (1x1 final maps) overflows float16's gradients, accumulated or
  # not.
  config.update(batch_size=8, accumulation_steps=2)
  mesh, run = conftest.train_setup(config, jax.devices()[:1])
  batches = conftest.random_batches(config, 4)
  for batch in batches:  # One input structure: one compiled step.
    batch['color_jitter'] = np.ones((config.batch_size, 3), np.float32)
  state, scales = run.state, []
  for batch in batches[:3]:
    state, metrics = run.train_step(state, sharding.global_batch(mesh, batch))
    assert float(metrics['finite']) == 1.0
    scales.append(float(metrics['loss_scale']))
  assert scales == [1024.0, 1024.0, 2048.0]  # growth_interval=2.
  before = jax.device_get(state)
  bad = batches[3]
  bad['color_jitter'][-1, 0] = np.nan  # A NaN image in the 2nd micro-batch.
  state, metrics = run.train_step(state, sharding.global_batch(mesh, bad))
  after = jax.device_get(state)
  assert float(metrics['finite']) == 0.0
  for name in ('params', 'batch_stats', 'opt_state'):
    conftest.assert_trees_equal(getattr(after, name), getattr(before, name))
  assert float(after.dynamic_scale.scale) == 1024.0
  assert int(after.step) == int(before.step) + 1


def test_accumulating_on_one_device_equals_unsynced_batch_norm_on_four(
    accumulation_and_mixing_results):
  results = accumulation_and_mixing_results
  # Params and BatchNorm statistics after 2 steps; only the order of
  # float32 sums differs. Measured 2.7e-6 here (AMD EPYC).
  assert results['accumulated_vs_four_devices'] < 1e-5
  accumulated, on_four = results['losses']
  np.testing.assert_allclose(accumulated, on_four, rtol=1e-5)


@pytest.mark.parametrize('micro_batches', [1, 2])
def test_each_device_and_micro_batch_mixes_by_its_own_draw(
    accumulation_and_mixing_results, micro_batches):
  mixed = accumulation_and_mixing_results[f'mixed_{micro_batches}']
  assert len(set(mixed['lams'])) == len(mixed['lams'])
  assert mixed['loss'] == pytest.approx(mixed['expected'], rel=1e-5)
  assert mixed['loss'] != pytest.approx(mixed['one_draw'], rel=1e-3)


if __name__ == '__main__':
  print(json.dumps(all_multidevice_checks(sys.argv[1])))
