r"""Prepares a dataset once, before training (see docs/data.md).

  python -m darknet53_jax.prepare_data --dataset=imagenet2012 \
      --manual_dir=DIR_WITH_THE_TWO_TARS --data_dir=DATA_DIR

``--dataset`` is any name ``config.dataset`` takes: a tensorflow-datasets
name (downloaded by tfds unless it needs manual archives) or
``image_folder:/path``. Run it on one machine with access to the data_dir.
The work is ``datasets.registry.prepare``'s; this module imports it (and
TensorFlow) only once the flags parsed, so ``--help`` answers at once.
"""

import sys

from absl import app
from absl import flags

from darknet53_jax import errors

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from darknet53_jax.datasets import registry  # pylint: disable=g-import-not-at-top
  try:
    registry.prepare(FLAGS.dataset, FLAGS.data_dir, FLAGS.manual_dir)
  except errors.UserError as e:
    sys.exit(f'error: {e}')


def define_flags() -> None:
  """The CLI's flags, defined only when run so that imports never clash."""
  flags.DEFINE_string('dataset', None, 'Dataset name, as config.dataset.')
  flags.DEFINE_string('data_dir', None,
                      'Where to write the prepared dataset (config.data_dir); '
                      'default: tfds\'s.')
  flags.DEFINE_string('manual_dir', None,
                      'Directory holding manually downloaded archives (for '
                      'imagenet2012: ILSVRC2012_img_train.tar and '
                      'ILSVRC2012_img_val.tar); default DATA_DIR/downloads/'
                      'manual.')
  flags.mark_flag_as_required('dataset')


if __name__ == '__main__':
  define_flags()
  app.run(main)
