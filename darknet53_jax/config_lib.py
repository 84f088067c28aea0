"""Config files: loading one by path, checking a config and the workdir once
before any work starts (with messages that say what to change), and the
config's flat form for hyperparameter logs and command lines."""

import functools
import importlib.util
import os

from etils import epath
import jax
import ml_collections

from darknet53_jax import errors
from darknet53_jax import model as model_lib
from darknet53_jax import optim
from darknet53_jax import precision
from darknet53_jax import rand_augment_spec

INTERPOLATIONS = ('bilinear', 'bicubic')
# timm's re_mode values (random_erasing.MODES).
RANDOM_ERASING_MODES = ('pixel', 'rand', 'const')


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


def check_workdir_writable(workdir: str) -> None:
  """Creates the workdir and proves it writable, before any work starts."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_probe_{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ConfigError(
        f'Cannot write to --workdir={workdir} ({e.strerror or e}): choose a '
        'directory you can write to.') from None


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, device_count: int,
             process_count: int) -> None:
  """Raises ConfigError on the first value that cannot work."""
  for name, choices in (
      ('dtype', tuple(sorted(precision.DTYPES))),
      ('lr_scaling', optim.LR_SCALING_RULES),
      ('cosine_schedule', optim.COSINE_SCHEDULES),
      ('lr_schedule', optim.LR_SCHEDULES),
      ('optimizer', optim.OPTIMIZERS),
      ('loss_scale_mode', precision.LOSS_SCALE_MODES),
      ('model.activation', model_lib.ACTIVATIONS),
      ('model.kernel_init', tuple(model_lib.KERNEL_INITS)),
      ('model.head_init', tuple(model_lib.HEAD_INITS)),
      ('interpolation', INTERPOLATIONS),
      ('random_erasing_mode', RANDOM_ERASING_MODES)):
    value = functools.reduce(getattr, name.split('.'), config)
    _require(value in choices,
             f'config.{name}={value!r}: use one of {choices}.')
  _require(0 <= config.model.bn_momentum <= 1,
           f'config.model.bn_momentum={config.model.bn_momentum}: use a '
           'value in [0, 1], the weight of the old running statistic '
           "(MindSpore's convention; PyTorch's momentum m is 1 - m here).")
  _require(config.skip_nonfinite_updates or config.dtype != 'float16' or
           config.loss_scale_mode == 'fixed',
           'config.skip_nonfinite_updates=False with float16 needs '
           "config.loss_scale_mode='fixed' (a dynamic scale must skip the "
           'steps it backs off on).')
  _require(config.eval_interpolation in (None, *INTERPOLATIONS),
           f'config.eval_interpolation={config.eval_interpolation!r}: use one '
           f'of {INTERPOLATIONS}, or None for config.interpolation.')
  _require(len(config.model.stage_depths) == len(model_lib.STAGE_WIDTHS),
           f'config.model.stage_depths needs {len(model_lib.STAGE_WIDTHS)} '
           f'entries, got {tuple(config.model.stage_depths)}.')
  for name in ('train_size', 'eval_size'):
    size = config[name]
    _require(size > 0 and size % 32 == 0,
             f'config.{name}={size}: Darknet-53 needs a multiple of 32.')
  if config.rand_augment:
    try:
      rand_augment_spec.parse(config.rand_augment)
    except ValueError as e:
      raise ConfigError(
          f'config.rand_augment={config.rand_augment!r}: {e}. Use timm\'s '
          'notation, e.g. "rand-m9-mstd0.5-inc1" (sections m, n, mstd, mmax, '
          'inc, p; docs/data.md), or "" for none.') from None
  _require(0 <= config.random_erasing <= 1,
           f'config.random_erasing={config.random_erasing}: use a '
           'probability in [0, 1] (0: off).')
  _require(0 < config.eval_crop_pct <= 1,
           f'config.eval_crop_pct={config.eval_crop_pct}: use a value in '
           '(0, 1].')
  _require(config.batch_size > 0 and config.batch_size % device_count == 0,
           f'config.batch_size={config.batch_size} does not divide over '
           f'{device_count} devices: use a multiple of {device_count}.')
  _require(config.batch_size % process_count == 0,
           f'config.batch_size={config.batch_size} does not divide over '
           f'{process_count} processes.')
  _require(isinstance(config.accumulation_steps, int) and
           config.accumulation_steps >= 1,
           f'config.accumulation_steps={config.accumulation_steps!r}: use an '
           'integer >= 1 (1: no accumulation).')
  per_device = config.batch_size // device_count
  _require(per_device % config.accumulation_steps == 0,
           f'config.batch_size={config.batch_size} is {per_device} per device '
           f'over {device_count} devices, which does not split into '
           f'config.accumulation_steps={config.accumulation_steps} '
           'micro-batches: use a batch_size that is a multiple of '
           f'{device_count * config.accumulation_steps}.')
  for name in ('mixup_alpha', 'cutmix_alpha'):
    _require(config[name] >= 0,
             f'config.{name}={config[name]}: use a value >= 0 (0: off).')
  for name in ('mix_prob', 'mix_switch_prob'):
    _require(0 <= config[name] <= 1,
             f'config.{name}={config[name]}: use a probability in [0, 1].')
  _require(config.num_epochs > 0, 'config.num_epochs must be positive.')
  _require(0 <= config.ema_decay < 1,
           f'config.ema_decay={config.ema_decay}: use 0 (no EMA) or a decay '
           'in (0, 1), e.g. 0.9998.')
  _validate_optimizer(config)
  _require(config.backbone_lr_multiplier >= 0,
           f'config.backbone_lr_multiplier={config.backbone_lr_multiplier}: '
           'use a value >= 0 (1.0: the head\'s rate).')


def _validate_optimizer(config: ml_collections.ConfigDict) -> None:
  """The optimiser's and the learning-rate schedule's numbers."""
  _require(config.weight_decay >= 0,
           f'config.weight_decay={config.weight_decay}: use a value >= 0.')
  _require(0 <= config.momentum < 1,
           f'config.momentum={config.momentum}: use a value in [0, 1).')
  for name in ('adam_b1', 'adam_b2'):
    _require(0 <= config[name] < 1,
             f'config.{name}={config[name]}: use a value in [0, 1).')
  for name in ('adam_eps', 'lars_trust_coefficient', 'lr_poly_power'):
    _require(config[name] > 0,
             f'config.{name}={config[name]}: use a value > 0.')
  _require(0 < config.lr_step_decay <= 1,
           f'config.lr_step_decay={config.lr_step_decay}: use a factor in '
           '(0, 1], the rate\'s multiplier at each of lr_step_epochs.')
  epochs = tuple(config.lr_step_epochs)
  _require(all(a < b for a, b in zip((0,) + epochs, epochs)),
           f'config.lr_step_epochs={epochs}: use positive epochs in '
           'increasing order.')
  _require(config.lr_schedule != 'step' or
           all(epoch < config.num_epochs for epoch in epochs),
           f'config.lr_step_epochs={epochs}: with '
           f'config.num_epochs={config.num_epochs} a step at or after the '
           'last epoch never applies; use earlier epochs.')


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
