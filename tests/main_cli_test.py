"""``main`` as a user runs it: training then ``--eval_only`` through the
compilation cache, and bad input stopping with one clear line."""

import glob
import os
import re

import pytest

from darknet53_jax import checkpoints
from tests import conftest

REPO = conftest.REPO


def _tiny_flags(data_dir):
  """``main``'s flags for one epoch of the tiny config."""
  config = conftest.tiny_config(data_dir)
  config.num_epochs = 1
  return conftest.main_flags(config)


def _compiled(cache_dir, name):
  """The compiled programs named ``name`` in a compilation cache."""
  return {f for f in os.listdir(cache_dir)
          if f.startswith(f'jit_{name}-') and f.endswith('-cache')}


def test_cli_trains_then_evaluates_only(digits_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  cache = tmp_path / 'xla'
  flags = [*_tiny_flags(digits_data_dir), f'--workdir={workdir}',
           f'--config.compilation_cache_dir={cache}']
  trained = conftest.run_main(*flags, '--config.profile_steps=2')
  assert trained.returncode == 0, trained.stderr[-2000:]
  assert checkpoints.checkpoint_step(workdir) == 11
  assert checkpoints.load_class_names(workdir) == [str(d) for d in range(10)]
  assert any(name.startswith('events.out.tfevents')
             for name in os.listdir(workdir))
  # One profile of two steps, not one per hour of training.
  assert len(glob.glob(f'{workdir}/plugins/profile/*/*.xplane.pb')) == 1
  assert re.search(r'First step done [\d.]+ s after the process started',
                   trained.stderr)
  train_steps, eval_steps = _compiled(cache, 'train_step'), _compiled(
      cache, 'eval_step')
  assert len(train_steps) == len(eval_steps) == 1
  evaluated = conftest.run_main(*flags, '--eval_only')
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  assert 'eval/num_examples=360' in evaluated.stderr
  assert checkpoints.checkpoint_step(workdir) == 11  # Nothing trained.
  # --eval_only reused the training run's compiled eval step.
  assert _compiled(cache, 'eval_step') == eval_steps


# Each a UserError, which main prints as one line; main_test raises the
# other bad data and checkpoints in-process (without seconds of importing
# TensorFlow each).
@pytest.mark.parametrize('case, extra, devices, message', [
    ('missing config', ['--config=configs/nope.py'], 1, 'nope.py'),
    ('batch over devices', ['--config.batch_size=3'], 2,
     'does not divide over 2 devices'),
    ('unknown key', ['--config.no_such_key=1'], 1, 'no_such_key'),
    ('config does not parse',
     [f'--config={REPO}/tests/data/broken_config.py'], 1,
     'SyntaxError'),
    ('dataset not prepared', ['--config.dataset=imagenet2012',
                              '--config.num_classes=1000'], 1,
     'not prepared'),
    ('workdir not writable', ['--workdir=/proc/darknet53'], 1,
     'Cannot write to --workdir=/proc/darknet53'),
])
def test_bad_input_stops_with_one_clear_line(digits_data_dir, tmp_path, case,
                                             extra, devices, message):
  del case
  result = conftest.run_main(*_tiny_flags(digits_data_dir),
                             f'--workdir={tmp_path}', *extra, devices=devices)
  assert result.returncode != 0
  assert message in result.stderr.strip().splitlines()[-1]
  assert 'Traceback' not in result.stderr


def test_checkpoint_of_another_shape_is_refused(digits_data_dir,
                                                tiny_checkpoint, tmp_path):
  result = conftest.run_main(*_tiny_flags(digits_data_dir),
                             f'--workdir={tmp_path}',
                             '--config.model.width_multiplier=0.25',
                             '--eval_only', f'--checkpoint={tiny_checkpoint}')
  assert result.returncode != 0
  assert 'does not fit this model' in result.stderr.strip().splitlines()[-1]
