"""Tests for darknet53_jax.checkpoints."""

import types

import jax
import numpy as np
import pytest

from darknet53_jax import checkpoints
from tests import conftest


def _state(config, num_classes=10):
  config = config.copy_and_resolve_references()
  config.num_classes = num_classes
  return conftest.train_setup(config, jax.devices()[:1])[1].state


@pytest.fixture(name='saved')
def fixture_saved(tmp_path):
  config = conftest.tiny_config()
  config.dtype = 'float16'
  state = _state(config).replace(step=7)
  manager = checkpoints.CheckpointManager(tmp_path / 'checkpoints', 2)
  manager.save(7, state, config)
  manager.close()
  return tmp_path, config, state


def test_restore_round_trips_every_field(saved):
  workdir, config, state = saved
  manager = checkpoints.CheckpointManager(workdir / 'checkpoints')
  assert manager.latest_step() == 7
  restored = manager.restore(_state(config))
  manager.close()
  assert int(restored.step) == 7
  assert float(restored.dynamic_scale.scale) == config.loss_scale
  conftest.assert_trees_equal(jax.device_get(restored),
                              jax.device_get(state))


def test_restored_state_has_the_types_of_a_fresh_one(saved):
  """Dtypes, weak types and shardings: a resumed run then reuses a fresh
  run's compiled train step."""
  workdir, config, _ = saved
  fresh = _state(config)
  manager = checkpoints.CheckpointManager(workdir / 'checkpoints')
  restored = manager.restore(fresh)
  manager.close()
  signature = lambda state: [(x.dtype, x.weak_type, x.sharding)
                             for x in jax.tree.leaves(state)]
  assert signature(restored) == signature(fresh)


def test_restore_into_another_shape_is_a_clear_error(saved):
  workdir, config, _ = saved
  manager = checkpoints.CheckpointManager(workdir / 'checkpoints')
  with pytest.raises(checkpoints.CheckpointError, match='does not fit'):
    manager.restore(_state(config, num_classes=11))
  manager.close()


def test_load_variables_and_config_from_workdir(saved):
  workdir, config, state = saved
  variables = checkpoints.load_variables(str(workdir))
  np.testing.assert_array_equal(variables['params']['head']['kernel'],
                                jax.device_get(state.params['head']['kernel']))
  assert checkpoints.load_config(str(workdir)).dtype == 'float16'
  assert checkpoints.checkpoint_step(str(workdir / 'checkpoints' / '7')) == 7


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match='No checkpoint at'):
    checkpoints.load_variables(str(tmp_path))


def test_check_compatible_names_the_mismatch():
  a = {'params': {'head': {'kernel': np.zeros((4, 10))}}}
  b = {'params': {'head': {'kernel': np.zeros((4, 11))}}}
  with pytest.raises(checkpoints.CheckpointError, match=r"\['head'\]"):
    checkpoints.check_compatible(a, b, 'ckpt')


DIGITS = [f'digit {i}' for i in range(10)]


def test_class_names_are_saved_with_the_dataset(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  config = conftest.tiny_config()
  manager = checkpoints.CheckpointManager(tmp_path)
  manager.save(3, _state(config).replace(step=3), config, class_names=DIGITS)
  manager.wait()
  assert int(manager.restore(_state(config)).step) == 3
  manager.close()
  assert checkpoints.load_class_names(str(tmp_path)) == DIGITS
  saved = json.loads(
      (tmp_path / '3' / checkpoints.CLASS_NAMES / 'metadata').read_text())
  assert saved == {'dataset': 'sklearn_digits', 'names': DIGITS}


def test_checkpoint_without_class_names_loads(saved):
  workdir, _, _ = saved
  assert not (workdir / 'checkpoints' / '7' / checkpoints.CLASS_NAMES).exists()
  assert checkpoints.load_class_names(str(workdir)) is None


def test_class_names_that_do_not_fit_are_refused(tmp_path):
  config = conftest.tiny_config()
  manager = checkpoints.CheckpointManager(tmp_path)
  with pytest.raises(ValueError, match='9 class names for '
                     'config.num_classes=10'):
    manager.save(1, _state(config), config, class_names=DIGITS[:9])
  manager.save(1, _state(config), config, class_names=DIGITS)
  manager.close()
  item = tmp_path / '1' / checkpoints.CLASS_NAMES
  (item / 'metadata').write_text('{"names": ["only one"]}')
  with pytest.raises(checkpoints.CheckpointError,
                     match='1 class names for a 10-class model: remove'):
    checkpoints.load_class_names(str(tmp_path))


def _variables_at(step: int):
  """A stand-in train state whose variables hold ``step``."""
  return types.SimpleNamespace(params={'w': np.full(2, step, np.float32)},
                               batch_stats={'m': np.zeros(1, np.float32)})


def test_best_checkpoint_keeps_the_highest_top1(tmp_path):
  config = conftest.tiny_config()
  best = checkpoints.BestCheckpoint(str(tmp_path))
  kept = [best.update(step, _variables_at(step), config, DIGITS,
                      {'top1': top1, 'top5': 1.0})
          for step, top1 in ((1, 0.5), (2, 0.8), (3, 0.6), (4, 0.8))]
  best.close()
  assert kept == [True, True, False, False]  # A tie keeps the earlier step.
  assert [p.name for p in tmp_path.iterdir()] == ['2']
  assert checkpoints.load_variables(str(tmp_path))['params']['w'][0] == 2
  assert checkpoints.load_metrics(str(tmp_path)) == {'top1': 0.8,
                                                    'top5': 1.0}
  assert checkpoints.load_class_names(str(tmp_path)) == DIGITS
  # A resumed run starts from the saved best; replaying an earlier step
  # that now scores higher replaces it.
  resumed = checkpoints.BestCheckpoint(str(tmp_path))
  assert (resumed.step, resumed.top1) == (2, 0.8)
  assert resumed.update(2, _variables_at(5), config, None, {'top1': 0.9})
  resumed.close()
  assert [p.name for p in tmp_path.iterdir()] == ['2']
  assert checkpoints.load_variables(str(tmp_path))['params']['w'][0] == 5
