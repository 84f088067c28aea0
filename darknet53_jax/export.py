r"""Exports a checkpoint's inference function: normalised images -> logits.

  python -m darknet53_jax.export --checkpoint=PATH \
      --format=saved_model|stablehlo --output=DIR \
      [--batch_size=dynamic|N] [--image_size=SIZE] [--platforms=cpu,cuda,tpu]

The function takes float32 NHWC images already resized, centre-cropped and
normalised as the checkpoint's eval preprocessing does (``config.json`` in
DIR holds that config) and returns float32 logits [batch, num_classes]. The
model runs in float32 with its BatchNorm statistics folded in.

- ``saved_model``: a TensorFlow SavedModel written through ``jax2tf``; the
  variables are SavedModel variables, the computation is StableHLO inside an
  ``XlaCallModule`` op. Load with ``tf.saved_model.load(DIR)`` and call it, or
  use its ``serving_default`` signature (input ``images``, output
  ``logits``).
- ``stablehlo``: ``DIR/model.jax_exported``, a serialized ``jax.export``
  artefact with the weights embedded. Load with
  ``jax.export.deserialize(data).call(images)``.

By default (``--batch_size=dynamic``) the export takes any batch size, as a
served model must; ``--batch_size=N`` fixes it to N.
"""

import importlib
import json
import os
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from darknet53_jax import errors
from darknet53_jax import model as model_lib
from darknet53_jax import predict

FLAGS = flags.FLAGS
FORMATS = ('saved_model', 'stablehlo')
DYNAMIC = 'dynamic'
STABLEHLO_FILE = 'model.jax_exported'
CONFIG_FILE = 'config.json'
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


class ExportError(errors.UserError, ValueError):
  """Export arguments that cannot work."""


def inference_function(model: model_lib.Darknet53) -> Callable:
  """(variables, images) -> logits, in eval mode, with the convolutions
  ``model`` has where it was built, portable to the other platforms."""
  model = model.clone(
      cpu_matmul_convs=model_lib.uses_cpu_convs(model.cpu_matmul_convs))
  return lambda variables, images: model.apply(variables, images, train=False)


def _input_shape(batch_size: int | None, image_size: int) -> tuple:
  """NHWC input shape; batch_size None gives a symbolic batch dimension."""
  if batch_size is None:
    batch_size, = jax.export.symbolic_shape('batch')
  return (batch_size, image_size, image_size, 3)


def export_stablehlo(model: model_lib.Darknet53, variables: dict,
                     batch_size: int | None, image_size: int,
                     platforms: Sequence[str] = DEFAULT_PLATFORMS) -> bytes:
  """A serialized ``jax.export.Exported`` of images -> logits.

  Args:
    model: the model.
    variables: its ``{'params', 'batch_stats'}``, embedded as constants.
    batch_size: fixed batch size, or None for any.
    image_size: height and width of the input images.
    platforms: platforms the artefact can run on.

  Returns:
    Bytes for ``jax.export.deserialize``.
  """
  apply = inference_function(model)
  exported = jax.export.export(
      jax.jit(lambda images: apply(variables, images)),
      platforms=tuple(platforms))(
          jax.ShapeDtypeStruct(_input_shape(batch_size, image_size),
                               jnp.float32))
  return bytes(exported.serialize())


def export_saved_model(model: model_lib.Darknet53, variables: dict,
                       batch_size: int | None, image_size: int,
                       output_dir: str,
                       platforms: Sequence[str] = DEFAULT_PLATFORMS) -> None:
  """Writes a TensorFlow SavedModel of images -> logits via jax2tf.

  Args:
    model: the model.
    variables: its ``{'params', 'batch_stats'}``, saved as tf.Variables.
    batch_size: fixed batch size, or None for any.
    image_size: height and width of the input images.
    output_dir: the SavedModel directory.
    platforms: platforms the embedded StableHLO can run on.
  """
  # Only this format needs TensorFlow: StableHLO exports and the CLI's
  # --help and argument errors do without its seconds of importing.
  importlib.import_module('darknet53_jax.datasets')  # Keeps TF off GPUs.
  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf
  import tensorflow as tf
  # pylint: enable=g-import-not-at-top
  converted = jax2tf.convert(
      inference_function(model),
      polymorphic_shapes=[None, None if batch_size else '(batch, ...)'],
      with_gradient=False, native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.variables_tree = tf.nest.map_structure(
      lambda x: tf.Variable(np.asarray(x), trainable=False), variables)
  spec = tf.TensorSpec((batch_size, image_size, image_size, 3), tf.float32,
                       name='images')
  module.__call__ = tf.function(
      lambda images: converted(module.variables_tree, images),
      input_signature=[spec], autograph=False, jit_compile=True)
  serving = tf.function(lambda images: {'logits': module.__call__(images)},
                        input_signature=[spec], autograph=False)
  tf.saved_model.save(module, output_dir, signatures={
      tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY: serving})


def parse_batch_size(value: str) -> int | None:
  """A positive int, or None for ``dynamic``."""
  if value == DYNAMIC:
    return None
  if value.isdigit() and int(value) > 0:
    return int(value)
  raise ExportError(f'--batch_size must be a positive integer or {DYNAMIC!r}, '
                    f'not {value!r}.')


def export_checkpoint(checkpoint: str, export_format: str, output_dir: str,
                      batch_size: int | None = None,
                      image_size: int | None = None,
                      platforms: Sequence[str] = DEFAULT_PLATFORMS,
                      ema: bool = False) -> None:
  """Exports a checkpoint's inference function and its config to output_dir.

  Args:
    checkpoint: a workdir, its checkpoints/ folder or a step folder.
    export_format: one of FORMATS.
    output_dir: directory to write (must not hold an export already).
    batch_size: fixed batch size, or None (the default) for any.
    image_size: input height and width; None: the config's eval_size.
    platforms: platforms the export can run on.
    ema: export the checkpoint's EMA variables instead of its live ones.

  Raises:
    ExportError: bad arguments or an existing export in output_dir.
    checkpoints.CheckpointError: no checkpoint there (or no EMA in it).
  """
  if export_format not in FORMATS:
    raise ExportError(f'--format must be one of {FORMATS}, not '
                      f'{export_format!r}.')
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ExportError(f'--platforms must name some of {PLATFORMS}; unknown: '
                      f'{unknown}.')
  output = epath.Path(output_dir)
  if output.exists() and any(output.iterdir()):
    raise ExportError(f'{output_dir} is not empty: give a new --output.')
  config, model, variables = predict.load_inference_model(checkpoint, ema)
  image_size = image_size or config.eval_size
  if export_format == 'saved_model':
    export_saved_model(model, variables, batch_size, image_size, output_dir,
                       platforms)
  else:
    output.mkdir(parents=True, exist_ok=True)
    (output / STABLEHLO_FILE).write_bytes(export_stablehlo(
        model, variables, batch_size, image_size, platforms))
  (output / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    export_checkpoint(FLAGS.checkpoint, FLAGS.format, FLAGS.output,
                      parse_batch_size(FLAGS.batch_size), FLAGS.image_size,
                      FLAGS.platforms, FLAGS.ema)
  except errors.UserError as e:
    sys.exit(f'error: {e}')
  logging.info('Wrote %s.', os.path.abspath(FLAGS.output))


def define_flags() -> None:
  """The CLI's flags, defined only when run so that imports never clash."""
  flags.DEFINE_string('checkpoint', None, 'A workdir, its checkpoints/ '
                      'folder or one step folder.')
  flags.DEFINE_enum('format', None, FORMATS, 'What to write.')
  flags.DEFINE_string('output', None, 'Directory to write.')
  flags.DEFINE_string('batch_size', DYNAMIC,
                      f'{DYNAMIC!r}: any batch size (for serving); or a '
                      'fixed batch size N.')
  flags.DEFINE_integer('image_size', None,
                       "Input height and width (default: the checkpoint's "
                       'eval_size).', lower_bound=1)
  flags.DEFINE_list('platforms', list(DEFAULT_PLATFORMS),
                    f'Platforms the export runs on: some of {PLATFORMS}.')
  flags.DEFINE_bool('ema', False, 'Export the EMA of the weights (a run with '
                    'config.ema_decay > 0).')
  flags.mark_flags_as_required(['checkpoint', 'format', 'output'])


if __name__ == '__main__':
  define_flags()
  app.run(main)
