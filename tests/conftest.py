"""Shared fixtures: tiny configs and the embedded digits data, prepared once."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # For `from configs import ...` in configs.

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Many tests compile the same tiny model: share compilations across them and
# across the subprocesses they start.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(REPO, '.pytest_cache', 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')


def tiny_config(data_dir=None):
  """The quick start shrunk to seconds: 1-block stages, 1/8 width, 2 epochs."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config()
  config.data_dir = data_dir
  config.model.width_multiplier = 0.125
  config.model.stage_depths = (1, 1, 1, 1, 1)
  config.num_epochs = 2
  config.batch_size = 128
  config.checkpoint_every_epochs = 1
  config.eval_every_epochs = 1
  config.log_every_steps = 5
  # Milder crops and a faster rate than the quick start: tiny runs stay in
  # the regime where reduction order moves results by rounding only.
  config.crop_area_range = (0.6, 1.0)
  config.learning_rate = 0.1
  return config


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
  """A tfds data_dir holding the prepared sklearn_digits dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from darknet53_jax import datasets  # noqa: F401  pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('sklearn_digits', data_dir=data_dir).download_and_prepare()
  return data_dir
