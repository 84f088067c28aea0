"""Tests for darknet53_jax.config_lib and the recipes in configs/."""

import os

import pytest

from darknet53_jax import build
from darknet53_jax import config_defaults
from darknet53_jax import config_lib
from tests import conftest

CONFIGS = os.path.join(conftest.REPO, 'configs')


def _load(name):
  return config_lib.load_file(os.path.join(CONFIGS, name))


@pytest.mark.parametrize('key, value, message', [
    ('dtype', 'float8', "config.dtype='float8': use one of"),
    ('cosine_schedule', 'per_batch',
     "config.cosine_schedule='per_batch': use one of "
     "('per_step_after_warmup', 'per_epoch_from_epoch0')."),
    ('loss_scale_mode', 'auto',
     "config.loss_scale_mode='auto': use one of ('dynamic', 'fixed')."),
    ('model.kernel_init', 'orthogonal',
     "config.model.kernel_init='orthogonal': use one of "
     "('he_normal', 'xavier_uniform')."),
    ('model.head_init', 'zeros',
     "config.model.head_init='zeros': use one of "
     "('lecun_normal', 'truncated_normal')."),
    ('model.bn_momentum', 1.5, 'config.model.bn_momentum=1.5: use a value in '
     '[0, 1]'),
    ('skip_nonfinite_updates', False,
     "config.skip_nonfinite_updates=False with float16 needs "
     "config.loss_scale_mode='fixed'"),
    ('accumulation_steps', 0,
     'config.accumulation_steps=0: use an integer >= 1'),
    ('accumulation_steps', 3,
     'config.batch_size=256 is 256 per device over 1 devices, which does not '
     'split into config.accumulation_steps=3 micro-batches: use a batch_size '
     'that is a multiple of 3.'),
    ('mixup_alpha', -0.2, 'config.mixup_alpha=-0.2: use a value >= 0'),
    ('cutmix_alpha', -1.0, 'config.cutmix_alpha=-1.0: use a value >= 0'),
    ('mix_prob', 1.5, 'config.mix_prob=1.5: use a probability in [0, 1].'),
    ('mix_switch_prob', -0.1,
     'config.mix_switch_prob=-0.1: use a probability in [0, 1].'),
])
def test_values_that_cannot_work_are_named_in_one_line(key, value, message):
  config = config_defaults.get_config()
  *parents, leaf = key.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, 1, 1)
  assert str(error.value).startswith(message)
  assert '\n' not in str(error.value)


def test_skipping_nothing_is_fine_outside_float16_and_with_a_fixed_scale():
  for dtype, mode in (('float32', 'dynamic'), ('float16', 'fixed')):
    config = config_defaults.get_config()
    config.update(dtype=dtype, loss_scale_mode=mode,
                  skip_nonfinite_updates=False)
    config_lib.validate(config, 1, 1)


def test_accumulation_splits_each_devices_share_of_the_batch():
  config = config_defaults.get_config()
  config.accumulation_steps = 4
  config_lib.validate(config, 8, 2)  # 32 per device, micro-batches of 8.
  config.accumulation_steps = 64
  with pytest.raises(config_lib.ConfigError,
                     match='32 per device over 8 devices.*multiple of 512'):
    config_lib.validate(config, 8, 2)


def test_recommended_recipe_is_the_defaults():
  assert _load('imagenet.py') == config_defaults.get_config()


def _changed_from_defaults(config) -> dict:
  defaults = config_lib.flat_config(config_defaults.get_config().to_dict())
  return {key: value for key, value in
          config_lib.flat_config(config.to_dict()).items()
          if defaults[key] != value}


@pytest.mark.parametrize('devices', [1, 8, 16])
def test_reference_recipe_is_the_references_8_by_256_run(devices):
  config = _load('imagenet_reference.py')
  config_lib.validate(config, devices, 1)
  # Every difference from the defaults, and nothing else.
  changed = _changed_from_defaults(config)
  assert changed == {
      'batch_size': 2048, 'lr_scaling': 'none', 'sync_batch_norm': False,
      'model.activation': 'relu', 'model.kernel_init': 'xavier_uniform',
      'model.head_init': 'truncated_normal', 'model.bn_momentum': 0.1,
      'model.bn_unbiased_variance': True,
      'cosine_schedule': 'per_epoch_from_epoch0',
      'loss_scale_mode': 'fixed', 'skip_nonfinite_updates': False}
  assert (config.dtype, config.loss_scale, config.learning_rate,
          config.num_epochs, config.warmup_epochs) == (
              'float16', 1024.0, 0.1, 150, 5)
  config.num_classes = 1000
  model = build.create_model(config)
  assert (model.activation, model.kernel_init, model.head_init,
          model.bn_momentum, model.bn_unbiased_variance,
          model.bn_axis_name) == ('relu', 'xavier_uniform',
                                  'truncated_normal', 0.1, True, None)


def test_modern_recipe_changes_what_its_docstring_names():
  config = _load('imagenet_modern.py')
  config_lib.validate(config, 8, 1)
  config.accumulation_steps = 2  # 4 devices x 2 micro-batches of 256.
  config_lib.validate(config, 4, 1)
  assert _changed_from_defaults(_load('imagenet_modern.py')) == {
      'num_epochs': 300, 'batch_size': 2048, 'optimizer': 'lamb',
      'learning_rate': 5e-3, 'lr_scaling': 'none', 'weight_decay': 0.02,
      'color_jitter': 0.0, 'rand_augment': 'rand-m7-mstd0.5-inc1',
      'mixup_alpha': 0.2, 'cutmix_alpha': 1.0, 'ema_decay': 0.9998,
      'ema_warmup': True, 'eval_size': 288, 'eval_crop_pct': 1.0,
      'eval_interpolation': 'bicubic'}
