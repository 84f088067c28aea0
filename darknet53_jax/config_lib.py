"""Config files: loading one by path, checking a config once before any
work starts (with messages that say what to change), and its flat form for
hyperparameter logs and command lines."""

import importlib.util
import os

import ml_collections

from darknet53_jax import errors
from darknet53_jax import model as model_lib
from darknet53_jax import optim
from darknet53_jax import precision

INTERPOLATIONS = ('bilinear', 'bicubic')


class ConfigError(errors.UserError, ValueError):
  """A config value that cannot work."""


def load_file(path: str) -> ml_collections.ConfigDict:
  """The ``get_config()`` of a config file such as ``configs/imagenet.py``,
  from any working directory."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, device_count: int,
             process_count: int) -> None:
  """Raises ConfigError on the first value that cannot work."""
  _require(config.dtype in precision.DTYPES,
           f'config.dtype={config.dtype!r}: use one of '
           f'{sorted(precision.DTYPES)}.')
  _require(config.lr_scaling in optim.LR_SCALING_RULES,
           f'config.lr_scaling={config.lr_scaling!r}: use one of '
           f'{optim.LR_SCALING_RULES}.')
  _require(config.model.activation in model_lib.ACTIVATIONS,
           f'config.model.activation={config.model.activation!r}: use one of '
           f'{model_lib.ACTIVATIONS}.')
  _require(len(config.model.stage_depths) == len(model_lib.STAGE_WIDTHS),
           f'config.model.stage_depths needs {len(model_lib.STAGE_WIDTHS)} '
           f'entries, got {tuple(config.model.stage_depths)}.')
  _require(config.interpolation in INTERPOLATIONS,
           f'config.interpolation={config.interpolation!r}: use one of '
           f'{INTERPOLATIONS}.')
  for name in ('train_size', 'eval_size'):
    size = config[name]
    _require(size > 0 and size % 32 == 0,
             f'config.{name}={size}: Darknet-53 needs a multiple of 32.')
  _require(0 < config.eval_crop_pct <= 1,
           f'config.eval_crop_pct={config.eval_crop_pct}: use a value in '
           '(0, 1].')
  _require(config.batch_size > 0 and config.batch_size % device_count == 0,
           f'config.batch_size={config.batch_size} does not divide over '
           f'{device_count} devices: use a multiple of {device_count}.')
  _require(config.batch_size % process_count == 0,
           f'config.batch_size={config.batch_size} does not divide over '
           f'{process_count} processes.')
  _require(config.num_epochs > 0, 'config.num_epochs must be positive.')
  _require(config.backbone_lr_multiplier >= 0,
           f'config.backbone_lr_multiplier={config.backbone_lr_multiplier}: '
           'use a value >= 0 (1.0: the head\'s rate).')


def flat_config(tree: dict, prefix: str = '') -> dict:
  """Nested config values as 'a.b' keys with scalar or string values."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flat_config(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value if isinstance(
          value, (bool, int, float, str)) else str(value)
  return flat
