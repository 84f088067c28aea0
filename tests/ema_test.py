"""Tests for the EMA of the variables (``config.ema_decay``): its arithmetic
in the train step, its checkpoints and its evaluation."""

import jax
import numpy as np
import pytest

from darknet53_jax import checkpoints
from darknet53_jax import ema
from darknet53_jax import predict
from darknet53_jax import sharding
from darknet53_jax import train_loop
from tests import conftest


def test_decay_warms_up_as_tensorflows_num_updates_rule():
  assert float(ema.decay_at(0, 0.9999, warmup=False)) == np.float32(0.9999)
  warmed = [float(ema.decay_at(n, 0.5, warmup=True)) for n in (0, 1, 8, 9)]
  np.testing.assert_allclose(warmed, [0.1, 2 / 11, 0.5, 0.5], rtol=1e-7)


def test_update_is_the_weighted_mean_of_every_leaf():
  average = {'params': {'w': np.array([1.0, 2.0])}, 'batch_stats': 4.0}
  new = {'params': {'w': np.array([3.0, 6.0])}, 'batch_stats': 0.0}
  got = ema.update(average, new, 0.75)
  np.testing.assert_allclose(got['params']['w'], [1.5, 3.0])
  assert got['batch_stats'] == 3.0


def _ema_config():
  config = conftest.tiny_config()
  config.dtype = 'float32'
  config.batch_size = 8
  config.ema_decay = 0.5
  config.ema_warmup = True
  return config


def _batches(config, nan_in_last: bool):
  batches = conftest.random_batches(config, 3)
  for batch in batches:
    batch['color_jitter'] = np.ones((config.batch_size, 3), np.float32)
  if nan_in_last:
    batches[-1]['color_jitter'][0, 0] = np.nan
  return batches


def test_train_steps_move_the_average_and_skipped_steps_do_not():
  config = _ema_config()
  mesh, run = conftest.train_setup(config, jax.devices()[:1])
  state = run.state
  expected = jax.device_get(state.variables())
  conftest.assert_trees_equal(jax.device_get(state.ema), expected)
  for step, batch in enumerate(_batches(config, nan_in_last=True)):
    state, metrics = run.train_step(state, sharding.global_batch(mesh, batch))
    if float(metrics['finite']):
      decay = min(0.5, (1 + step) / (10 + step))  # 0.1, then 2/11.
      expected = jax.tree.map(lambda a, v, d=decay: d * a + (1 - d) * v,
                              expected, jax.device_get(state.variables()))
  assert float(metrics['finite']) == 0.0  # The last step was skipped.
  got = jax.device_get(state.ema)
  for path, want in jax.tree_util.tree_leaves_with_path(expected):
    np.testing.assert_allclose(
        np.asarray(dict(jax.tree_util.tree_leaves_with_path(got))[path]),
        want, rtol=2e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  # Two updates at decays 0.1 and 2/11 left the average off the params.
  assert not np.allclose(got['params']['head']['kernel'],
                         np.asarray(state.params['head']['kernel']))


def test_checkpoints_keep_the_average(tmp_path, tiny_checkpoint):
  config = _ema_config()
  mesh, run = conftest.train_setup(config, jax.devices()[:1])
  state, _ = run.train_step(run.state, sharding.global_batch(
      mesh, _batches(config, nan_in_last=False)[0]))
  manager = checkpoints.CheckpointManager(str(tmp_path))
  manager.save(1, state, config)
  manager.close()
  conftest.assert_trees_equal(
      checkpoints.load_variables(str(tmp_path), ema=True),
      jax.device_get(state.ema))
  conftest.assert_trees_equal(checkpoints.load_variables(str(tmp_path)),
                              jax.device_get(state.variables()))
  with pytest.raises(checkpoints.CheckpointError,
                     match='holds no EMA variables .* drop --ema'):
    checkpoints.load_variables(tiny_checkpoint, ema=True)


def test_training_evaluates_and_keeps_the_average(digits_data_dir, tmp_path,
                                                  caplog):
  config = conftest.tiny_config(digits_data_dir)
  config.num_epochs = 1
  config.ema_decay = 0.9
  workdir = str(tmp_path)
  with caplog.at_level('INFO', logger='absl'):
    live = train_loop.train_and_evaluate(config, workdir)
  assert 'eval_ema at step 11' in caplog.text
  assert train_loop.evaluate_checkpoint(config, workdir) == live
  averaged = train_loop.evaluate_checkpoint(config, workdir, ema=True)
  assert averaged['num_examples'] == 360
  # The best checkpoint keeps the average too.
  best = checkpoints.load_variables(str(checkpoints.workdir_best(workdir)),
                                    ema=True)
  conftest.assert_trees_equal(
      best, checkpoints.load_variables(workdir, ema=True))
  assert averaged != live
  # predict and export read the average with ema=True.
  conftest.assert_trees_equal(
      predict.load_inference_model(workdir, ema=True)[2],
      checkpoints.load_variables(workdir, ema=True))


def test_resuming_a_run_without_an_average_with_one_is_refused(tmp_path):
  config = _ema_config()
  config.ema_decay = 0.0
  _, run = conftest.train_setup(config, jax.devices()[:1])
  manager = checkpoints.CheckpointManager(str(tmp_path))
  manager.save(1, run.state, config)
  manager.close()
  _, run = conftest.train_setup(_ema_config(), jax.devices()[:1])
  with pytest.raises(checkpoints.CheckpointError,
                     match='can be restored into this run .*config.ema_decay'):
    checkpoints.CheckpointManager(str(tmp_path)).restore_latest_good(
        run.state)
