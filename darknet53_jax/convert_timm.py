r"""Converts timm's ``darknet53`` weights into a Darknet-53 checkpoint.

  python -m darknet53_jax.convert_timm --input=FILE.pth|FILE.safetensors \
      --output=DIR

timm (``timm/models/cspnet.py``) names the tensors ``stem.conv1.*``,
``stages.{s}.conv_down.*``, ``stages.{s}.blocks.{b}.conv{1,2}.*`` and
``head.fc.*``; every conv is ``.conv.weight`` (OIHW) followed by a BatchNorm
``.bn.{weight,bias,running_mean,running_var,num_batches_tracked}``. The depth
of each stage, the width and the number of classes are read off the tensors,
so timm models built with other depths or widths convert too.

The output is a step-0 checkpoint (``checkpoints.CheckpointManager`` layout)
whose config carries the model and timm's eval protocol for
``darknet53.c2ns_in1k`` (256 px, crop_pct 0.887, bicubic), so predict, export,
``--eval_only`` and ``config.init_from`` read it like any other checkpoint.
torch (for ``.pth``) and safetensors are needed only here, and only when used.
"""

import importlib
import os
import re
import sys
from typing import Any, Mapping

from absl import app
from absl import flags
from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from darknet53_jax import checkpoints
from darknet53_jax import config_defaults
from darknet53_jax import errors
from darknet53_jax import model as model_lib

FLAGS = flags.FLAGS

# timm's darknet53.c2ns_in1k eval protocol: resize the shorter side to
# floor(256 / 0.887) = 288 with bicubic interpolation, centre-crop 256.
TIMM_EVAL_SIZE = 256
TIMM_EVAL_CROP_PCT = 0.887
TIMM_INTERPOLATION = 'bicubic'
TIMM_NEGATIVE_SLOPE = 0.01  # nn.LeakyReLU's default.

# (Flax collection, Flax leaf name) -> timm tensor name.
_LEAVES = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}
_DOWN = re.compile(r'stage(\d+)_down$')
_BLOCK = re.compile(r'stage(\d+)_block(\d+)$')
_TIMM_BLOCK = re.compile(r'stages\.(\d+)\.blocks\.(\d+)\.')
_IGNORED = '.num_batches_tracked'
_STEM_KEY = 'stem.conv1.conv.weight'
_LAST_DOWN_KEY = (f'stages.{len(model_lib.STAGE_WIDTHS) - 1}'
                  '.conv_down.conv.weight')
_HEAD_KEY = 'head.fc.weight'
_LISTED = 5  # Keys named in an error message.


class ConversionError(errors.UserError, ValueError):
  """Weights that are unreadable or not laid out as timm's darknet53."""


def timm_key(flax_path: tuple[str, ...]) -> str:
  """timm's state-dict key for a flattened Flax variable path.

  Args:
    flax_path: (collection, module, ..., leaf), for example
      ``('params', 'stage2_block3', 'conv1', 'conv', 'kernel')``.

  Returns:
    The timm key, for example ``'stages.2.blocks.3.conv1.conv.weight'``.
  """
  collection, top, *inner, leaf = flax_path
  if top == 'stem':
    module = 'stem.conv1'
  elif top == 'head':
    module = 'head.fc'
  elif down := _DOWN.match(top):
    module = f'stages.{down[1]}.conv_down'
  elif block := _BLOCK.match(top):
    module = f'stages.{block[1]}.blocks.{block[2]}'
  else:
    raise ValueError(f'No timm name for Flax module {top!r}.')
  return '.'.join([module, *inner, _LEAVES[collection, leaf]])


def infer_model(state_dict: Mapping[str, Any]) -> model_lib.Darknet53:
  """The Darknet-53 (depths, width, classes) that a timm state dict holds."""
  absent = [k for k in (_STEM_KEY, _LAST_DOWN_KEY, _HEAD_KEY)
            if k not in state_dict]
  if absent:
    raise ConversionError(
        f'Not a timm darknet53 state dict: no {", ".join(absent)} among its '
        f'{len(state_dict)} keys (first: {_listing(state_dict)}).')
  depths = [0] * len(model_lib.STAGE_WIDTHS)
  for key in state_dict:
    match = _TIMM_BLOCK.match(key)
    if match and int(match[1]) < len(depths):
      stage, block = int(match[1]), int(match[2])
      depths[stage] = max(depths[stage], block + 1)
  width = state_dict[_LAST_DOWN_KEY].shape[0] / model_lib.STAGE_WIDTHS[-1]
  return model_lib.Darknet53(
      num_classes=int(state_dict[_HEAD_KEY].shape[0]),
      activation='leaky_relu', negative_slope=TIMM_NEGATIVE_SLOPE,
      width_multiplier=width, stage_depths=tuple(depths), dtype=jnp.float32)


def load_timm_state_dict(
    state_dict: Mapping[str, Any],
    dtype: Any = np.float32) -> tuple[model_lib.Darknet53, dict]:
  """Converts timm darknet53 weights to this project's model and variables.

  Args:
    state_dict: timm's tensor names -> torch tensors or NumPy arrays, as from
      ``torch.load(..., weights_only=True)`` or a safetensors file.
    dtype: the NumPy dtype of the variables (float64 keeps a float64 model's
      values, for numerical comparisons).

  Returns:
    (model, ``{'params', 'batch_stats'}`` as NumPy arrays): conv
    kernels OIHW -> HWIO, the classifier [out, in] -> [in, out], BatchNorm
    weight/bias/running_mean/running_var -> scale/bias/mean/var.

  Raises:
    ConversionError: keys missing or unexpected, or shapes that do not fit.
  """
  model = infer_model(state_dict)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32), train=False))
  targets = traverse_util.flatten_dict(abstract)
  paths = {timm_key(path): path for path in targets}
  given = {key for key in state_dict if not key.endswith(_IGNORED)}
  missing, unexpected = set(paths) - given, given - set(paths)
  if missing or unexpected:
    problems = [f'{len(keys)} {kind} ({_listing(keys)})'
                for kind, keys in (('missing', missing),
                                   ('unexpected', unexpected)) if keys]
    raise ConversionError(
        f'State dict does not match timm darknet53 with stage depths '
        f'{tuple(model.stage_depths)}: {"; ".join(problems)}.')
  converted = {}
  for key, path in paths.items():
    array = _to_numpy(state_dict[key], dtype)
    if array.ndim == 4:
      array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
    elif array.ndim == 2:
      array = array.T  # Linear [out, in] -> Dense [in, out].
    if array.shape != targets[path].shape:
      raise ConversionError(
          f'{key} has shape {tuple(state_dict[key].shape)}, which does not '
          f'fit {"/".join(path)} {targets[path].shape} of a Darknet-53 with '
          f'width_multiplier={model.width_multiplier} (channels must be '
          "darknet53's scaled by one factor).")
    converted[path] = array
  return model, traverse_util.unflatten_dict(converted)


def read_state_dict(path: str) -> Mapping[str, Any]:
  """A state dict from a torch pickle (weights only) or a safetensors file."""
  if not os.path.isfile(path):
    raise ConversionError(f'No such file: {path}.')
  if path.endswith('.safetensors'):
    safetensors_numpy = _import('safetensors.numpy', 'safetensors')
    loader = safetensors_numpy.load_file
  else:
    torch = _import('torch', 'torch')
    loader = lambda p: torch.load(p, map_location='cpu', weights_only=True)
  try:
    state = loader(path)
  except Exception as e:  # pylint: disable=broad-except
    # torch and safetensors raise many types for a corrupt or foreign file.
    raise ConversionError(
        f'Cannot read {path}: {errors.first_line(e)}') from None
  # timm's train.py checkpoints hold the weights under 'state_dict'.
  if isinstance(state, Mapping) and isinstance(state.get('state_dict'),
                                               Mapping):
    state = state['state_dict']
  if not isinstance(state, Mapping):
    raise ConversionError(f'{path} holds a {type(state).__name__}, not a '
                          'state dict.')
  return state


def timm_config(model: model_lib.Darknet53) -> ml_collections.ConfigDict:
  """``config_defaults`` set to ``model`` and timm's eval protocol."""
  config = config_defaults.get_config()
  config.num_classes = model.num_classes
  config.model.activation = model.activation
  config.model.negative_slope = model.negative_slope
  config.model.width_multiplier = model.width_multiplier
  config.model.stage_depths = tuple(model.stage_depths)
  config.eval_size = TIMM_EVAL_SIZE
  config.eval_crop_pct = TIMM_EVAL_CROP_PCT
  config.interpolation = TIMM_INTERPOLATION
  config.dtype = 'float32'
  return config


def convert(input_path: str, output_dir: str) -> model_lib.Darknet53:
  """Converts a timm weights file into a step-0 checkpoint in output_dir."""
  model, variables = load_timm_state_dict(read_state_dict(input_path))
  manager = checkpoints.CheckpointManager(output_dir)
  try:
    if manager.latest_step() is not None:
      raise ConversionError(f'{output_dir} already holds a checkpoint: give '
                            'a new --output directory.')
    manager.save(0, variables, timm_config(model))
    manager.wait()
  finally:
    manager.close()
  return model


def _import(module: str, package: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ConversionError(f'Reading this file needs {package}: pip install '
                          f'{package}.') from None


def _to_numpy(value: Any, dtype: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # A torch tensor; bfloat16 has no NumPy twin.
    value = value.detach().cpu().double().numpy()
  return np.array(value, dtype)  # A copy: never a live tensor's memory.


def _listing(keys) -> str:
  keys = sorted(keys)
  more = f', ... {len(keys) - _LISTED} more' if len(keys) > _LISTED else ''
  return ', '.join(keys[:_LISTED]) + more


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    model = convert(FLAGS.input, FLAGS.output)
  except errors.UserError as e:
    sys.exit(f'error: {e}')
  logging.info('Wrote %s: Darknet-53, %d classes, width %g, depths %s.',
               FLAGS.output, model.num_classes, model.width_multiplier,
               tuple(model.stage_depths))


def define_flags() -> None:
  """The CLI's flags, defined only when run so that imports never clash."""
  flags.DEFINE_string('input', None, 'timm darknet53 weights: a torch state '
                      'dict (.pth, .pt, .bin) or a .safetensors file.')
  flags.DEFINE_string('output', None, 'New checkpoint directory to write.')
  flags.mark_flags_as_required(['input', 'output'])


if __name__ == '__main__':
  define_flags()
  app.run(main)
