"""Preemption, crashes, damaged checkpoints and divergence."""

import logging
import random
import signal
import subprocess
import sys
import time

import pytest

from darknet53_jax import checkpoints
from darknet53_jax import precision
from darknet53_jax import train_loop
from tests import conftest

EPOCHS = 3
STEPS = EPOCHS * (1437 // 128)


def _config(data_dir):
  """The tiny config for three epochs, logging every step."""
  config = conftest.tiny_config(data_dir)
  config.num_epochs = EPOCHS
  config.eval_every_epochs = EPOCHS
  config.log_every_steps = 1
  return config


def _start(data_dir, workdir):
  env = conftest.subprocess_env(optimized=True)
  return subprocess.Popen(
      [sys.executable, '-m', 'darknet53_jax.main',
       *conftest.main_flags(_config(data_dir)), f'--workdir={workdir}'],
      cwd=conftest.REPO, env=env, stderr=subprocess.PIPE, text=True)


def _wait_for_training(process, steps: int = 1, timeout=300) -> str:
  """Reads the log until ``steps`` steps' train metrics appeared; returns
  it."""
  deadline = time.time() + timeout
  log = []
  for line in process.stderr:
    log.append(line)
    steps -= 'train/loss' in line
    if steps == 0 or time.time() > deadline:
      return ''.join(log)
  raise AssertionError(f'training ended {steps} logged steps early')


def _finish(data_dir, workdir):
  process = _start(data_dir, workdir)
  _, err = process.communicate(timeout=600)
  assert process.returncode == 0, err[-3000:]
  return err


@pytest.fixture(scope='module')
def reference_params(digits_data_dir, tmp_path_factory):
  """Parameters of an uninterrupted run of the same command (compiled as
  the interrupted runs are: XLA's optimisation levels round differently)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  _finish(digits_data_dir, workdir)
  return checkpoints.load_variables(str(workdir))


def test_sigterm_then_sigkill_resume_to_the_uninterrupted_result(
    digits_data_dir, tmp_path, reference_params):
  # SIGTERM (a preemption notice): the current step is checkpointed.
  process = _start(digits_data_dir, tmp_path)
  _wait_for_training(process, steps=3)
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=300)
  assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
  stopped_at = checkpoints.checkpoint_step(str(tmp_path))
  assert f'stopped by SIGTERM at step {stopped_at}' in err
  assert 0 < stopped_at < STEPS

  # SIGKILL at a random step of the resumed run, before its end: the next
  # run resumes from the last complete checkpoint.
  process = _start(digits_data_dir, tmp_path)
  assert f'Resumed from step {stopped_at}' in _wait_for_training(process)
  _wait_for_training(
      process, steps=random.Random(0).randint(1, STEPS - stopped_at - 2))
  process.kill()
  process.communicate(timeout=60)
  err = _finish(digits_data_dir, tmp_path)
  assert 'Traceback' not in err
  assert checkpoints.checkpoint_step(str(tmp_path)) == STEPS
  conftest.assert_trees_equal(checkpoints.load_variables(str(tmp_path)),
                              reference_params)


def test_damaged_latest_checkpoint_is_skipped(digits_data_dir, tmp_path,
                                              caplog):
  caplog.set_level(logging.INFO, logger='absl')
  config = conftest.tiny_config(digits_data_dir)
  train_loop.train_and_evaluate(config, str(tmp_path), stop_at_step=13)
  directory = tmp_path / 'checkpoints'
  assert sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit()) == [11, 13]
  for path in (directory / '13' / 'state').rglob('*'):
    if path.is_file() and path.stat().st_size > 1000:
      path.write_bytes(path.read_bytes()[:100])  # Truncate the arrays.
  train_loop.train_and_evaluate(config, str(tmp_path), stop_at_step=14)
  assert 'Skipping unreadable checkpoint' in caplog.text
  assert 'Resumed from step 11' in caplog.text
  assert checkpoints.checkpoint_step(str(tmp_path)) == 14


def test_diverging_float32_run_stops_with_a_clear_error(digits_data_dir,
                                                       tmp_path):
  config = conftest.tiny_config(digits_data_dir)
  config.learning_rate = 1e30
  config.warmup_epochs = 0
  config.max_consecutive_nonfinite_steps = 3
  config.log_every_steps = 1
  with pytest.raises(precision.DivergedError, match='non-finite'):
    train_loop.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints' / '22').exists()
