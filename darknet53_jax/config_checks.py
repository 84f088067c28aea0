"""Checks a config once, before any work starts, with messages that say what
to change."""

import ml_collections

from darknet53_jax import model as model_lib
from darknet53_jax import optim
from darknet53_jax import train

INTERPOLATIONS = ('bilinear', 'bicubic')


class ConfigError(ValueError):
  """A config value that cannot work."""


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, device_count: int,
             process_count: int) -> None:
  """Raises ConfigError on the first value that cannot work."""
  _require(config.dtype in train.DTYPES,
           f'config.dtype={config.dtype!r}: use one of {sorted(train.DTYPES)}.')
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
