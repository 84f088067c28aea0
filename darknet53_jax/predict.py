r"""Classifies images with a checkpoint and prints the top-5 classes.

  python -m darknet53_jax.predict --checkpoint=PATH IMAGE [IMAGE ...]

Images go through the checkpoint's own eval preprocessing (``eval_size``,
``eval_crop_pct``, ``interpolation``, ``mean_rgb``, ``std_rgb`` of its saved
config) and the model runs in float32. A file that is missing or not an image
gets a one-line error and the others are still classified; the exit code is
then nonzero. TensorFlow (image decoding, ImageNet's class names) is imported
only where needed, so ``--help``, argument errors and ``export``, which
imports this module, do without it.
"""

import sys
from typing import Sequence

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from darknet53_jax import build
from darknet53_jax import checkpoints
from darknet53_jax import errors
from darknet53_jax import model as model_lib
from darknet53_jax import steps

FLAGS = flags.FLAGS
TOP_K = 5


class ImageError(errors.UserError, ValueError):
  """A file that cannot be read or decoded as an image."""


def load_inference_model(
    checkpoint: str, ema: bool = False
) -> tuple[ml_collections.ConfigDict, model_lib.Darknet53, dict]:
  """The config, float32 model and variables saved in a checkpoint.

  Args:
    checkpoint: a workdir, its checkpoints/ folder or a step folder.
    ema: the EMA of the variables instead of the live ones.

  Returns:
    (config with ``dtype='float32'``, model, ``{'params', 'batch_stats'}``).

  Raises:
    checkpoints.CheckpointError: no checkpoint there (or no EMA in it).
  """
  config = checkpoints.load_config(checkpoint)
  config.dtype = 'float32'
  variables = checkpoints.load_variables(checkpoint, ema)
  return config, build.create_model(config), variables


def class_names(config: ml_collections.ConfigDict,
                saved: Sequence[str] | None = None) -> list[str]:
  """Human-readable names of the config's classes, by label index.

  Args:
    config: the checkpoint's config.
    saved: the names saved with the checkpoint
      (``checkpoints.load_class_names``), if any.

  Returns:
    The saved names; for an ImageNet checkpoint saved without them,
    ImageNet's 1000 names in the synset order of tensorflow-datasets and
    timm; otherwise ``class <i>``.
  """
  if saved is not None:
    return list(saved)
  if config.dataset.startswith('imagenet'):
    # tensorflow-datasets ships ImageNet's 1000 readable names with SI-Score.
    from tensorflow_datasets.datasets.siscore import labels  # pylint: disable=g-import-not-at-top
    if config.num_classes == len(labels.IMAGENET_LABELS_LIST):
      return list(labels.IMAGENET_LABELS_LIST)
  return [f'class {i}' for i in range(config.num_classes)]


def load_image(path: str, config: ml_collections.ConfigDict) -> np.ndarray:
  """One image, preprocessed for eval: uint8 [eval_size, eval_size, 3]."""
  # pylint: disable=g-import-not-at-top
  # First: importing the input pipeline keeps TensorFlow off the GPUs.
  from darknet53_jax import input_pipeline
  import tensorflow as tf
  # pylint: enable=g-import-not-at-top
  if not tf.io.gfile.exists(path):
    raise ImageError('no such file')
  if tf.io.gfile.isdir(path):
    raise ImageError('is a directory')
  try:
    return input_pipeline.eval_preprocessing(config)(
        tf.io.read_file(path)).numpy()
  except tf.errors.InvalidArgumentError:
    raise ImageError('not an image TensorFlow can decode (JPEG, PNG, GIF, '
                     'BMP, WebP)') from None


def predict_files(checkpoint: str, paths: list[str],
                  ema: bool = False) -> int:
  """Prints each image's top classes (``ema``: by the checkpoint's EMA
  variables); returns how many files failed."""
  config, model, variables = load_inference_model(checkpoint, ema)
  names = class_names(config, checkpoints.load_class_names(checkpoint))
  normalize = steps.image_normalizer(config)
  probabilities = jax.jit(
      lambda v, images: jax.nn.softmax(model.apply(v, normalize(images))))
  failed = 0
  for path in paths:
    try:
      image = load_image(path, config)
    except ImageError as e:
      print(f'error: {path}: {e}', file=sys.stderr)
      failed += 1
      continue
    probs = np.asarray(probabilities(variables, image[None])[0])
    print(path)
    for i in np.argsort(-probs)[:TOP_K]:
      print(f'  {probs[i]:.4f}  {names[i]}')
  return failed


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Give one or more image files.')
  try:
    failed = predict_files(FLAGS.checkpoint, paths, FLAGS.ema)
  except errors.UserError as e:
    sys.exit(f'error: {e}')
  if failed:
    sys.exit(f'error: {failed} of {len(paths)} files could not be '
             'classified.')


def define_flags() -> None:
  """The CLI's flags, defined only when run so that imports never clash."""
  flags.DEFINE_string('checkpoint', None, 'A workdir, its checkpoints/ '
                      'folder or one step folder.')
  flags.DEFINE_bool('ema', False, 'Use the EMA of the weights (a run with '
                    'config.ema_decay > 0).')
  flags.mark_flag_as_required('checkpoint')


if __name__ == '__main__':
  define_flags()
  app.run(main)
