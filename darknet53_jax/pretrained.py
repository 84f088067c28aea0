"""Starting a run from the weights people have (``config.init_from``).

The source is a checkpoint of this project (a workdir, its ``checkpoints/``
folder or one step folder) or timm's darknet53 weights as downloaded: a file,
``.pth``/``.bin`` (read with ``torch.load(weights_only=True)``) or
``.safetensors``, converted on the fly by ``convert_timm``. Every tensor of
the source must fit the run's model, except the classifier's: when only the
number of classes differs, the head keeps its fresh initialisation and the
rest loads (a fine-tune). The log lists what was loaded and what is new.
"""

import os

from absl import logging
from flax import traverse_util
import ml_collections

from darknet53_jax import checkpoints
from darknet53_jax import convert_timm
from darknet53_jax import model as model_lib

_ADVICE = ('Set config.model (width_multiplier, stage_depths) as in those '
           'weights.')


def _activation(activation: str, negative_slope: float) -> str:
  if activation == 'leaky_relu':
    return f'leaky_relu, slope {negative_slope:g}'
  return activation


def load(source: str) -> tuple[dict, str, str]:
  """The ``{'params', 'batch_stats'}`` of ``source``, as host arrays.

  Returns:
    (variables, what the source is, the activation it was trained with).

  Raises:
    checkpoints.CheckpointError: nothing at ``source``, or a directory
      without a checkpoint.
    convert_timm.ConversionError: a file that is not timm darknet53 weights.
  """
  if not os.path.exists(source):
    raise checkpoints.CheckpointError(
        f'config.init_from={source!r} does not exist: give a checkpoint (a '
        'workdir, its checkpoints/ folder or a step folder) or timm '
        'darknet53 weights (.pth, .bin or .safetensors).')
  if os.path.isfile(source):
    model, variables = convert_timm.load_timm_state_dict(
        convert_timm.read_state_dict(source))
    return (variables, 'timm weights',
            _activation(model.activation, model.negative_slope))
  config = checkpoints.load_config(source)
  return (checkpoints.load_variables(source),
          f'checkpoint step {checkpoints.checkpoint_step(source)}',
          _activation(config.model.activation, config.model.negative_slope))


def _is_new_head(path: tuple, loaded, fresh) -> bool:
  """Whether ``path`` is a classifier tensor that differs from ``fresh``
  in its class count (its last dimension) only."""
  return (path[1] == model_lib.HEAD and loaded is not None and
          loaded.shape[:-1] == fresh.shape[:-1] and
          loaded.shape != fresh.shape)


def fit(loaded: dict, fresh: dict, source: str) -> tuple[dict, list, list]:
  """``fresh``'s variables with ``loaded``'s in their place where they fit.

  Args:
    loaded: the source's ``{'params', 'batch_stats'}``.
    fresh: the run's initial ``{'params', 'batch_stats'}``.
    source: the source's path, for messages.

  Returns:
    (the variables, the paths loaded, the paths kept fresh: the head's when
    the class counts differ), paths as tuples of names.

  Raises:
    checkpoints.CheckpointError: any other tensor is missing, extra or of
      another shape, named in one line.
  """
  loaded_flat = traverse_util.flatten_dict(loaded)
  fresh_flat = traverse_util.flatten_dict(fresh)
  new = [path for path, value in fresh_flat.items()
         if _is_new_head(path, loaded_flat.get(path), value)]
  checkpoints.check_compatible(
      *(traverse_util.unflatten_dict(
          {p: v for p, v in flat.items() if p not in new})
        for flat in (loaded_flat, fresh_flat)), source, _ADVICE)
  kept = [path for path in fresh_flat if path not in new]
  return (traverse_util.unflatten_dict(
      {**fresh_flat, **{p: loaded_flat[p] for p in kept}}), kept, new)


def initialise(config: ml_collections.ConfigDict, fresh: dict) -> dict:
  """``fresh`` with ``config.init_from``'s tensors; logs which were loaded
  and which are new.

  Raises:
    checkpoints.CheckpointError, convert_timm.ConversionError: the source is
      missing, unreadable or does not fit the model but for its classes.
  """
  source = config.init_from
  loaded, kind, activation = load(source)
  variables, kept, new = fit(loaded, fresh, source)
  modules = dict.fromkeys(path[1] for path in kept)
  logging.info('Initialised from %s (%s): loaded %d tensors (params and '
               'batch_stats) of %s.', source, kind, len(kept),
               ', '.join(modules))
  if new:
    fresh_flat = traverse_util.flatten_dict(fresh)
    logging.info(
        'New, initialised afresh: %s (this run has %d classes, the source '
        '%d).', ', '.join(f'{"/".join(path)} {fresh_flat[path].shape}'
                          for path in new),
        config.num_classes, loaded['params'][model_lib.HEAD]['bias'].shape[0])
  run_activation = _activation(config.model.activation,
                               config.model.negative_slope)
  if activation != run_activation:
    logging.warning('%s was trained with %s, this run uses %s: set '
                    'config.model to match unless that is intended.', source,
                    activation, run_activation)
  return variables
