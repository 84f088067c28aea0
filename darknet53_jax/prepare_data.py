r"""Prepares a dataset once, before training (see docs/data.md).

  python -m darknet53_jax.prepare_data --dataset=imagenet2012 \
      --manual_dir=DIR_WITH_THE_TWO_TARS --data_dir=DATA_DIR

``--dataset`` is any name ``config.dataset`` takes: a tensorflow-datasets
name (downloaded by tfds unless it needs manual archives) or
``image_folder:/path``. Run it on one machine with access to the data_dir.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

from darknet53_jax import errors
from darknet53_jax.datasets import registry

FLAGS = flags.FLAGS


def prepare(dataset: str, data_dir: str | None,
            manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Prepares ``dataset`` in ``data_dir`` unless it already is.

  Args:
    dataset: as ``config.dataset``.
    data_dir: as ``config.data_dir``.
    manual_dir: the directory holding manually downloaded archives.

  Returns:
    The prepared builder.

  Raises:
    DataError: for an unknown dataset or missing manual archives.
  """
  builder = registry.builder_from_name(dataset, data_dir)
  if builder.is_prepared():
    logging.info('%s is already prepared in %s.', dataset, builder.data_dir)
    return builder
  missing = registry.missing_manual_files(builder, manual_dir)
  if missing:
    directory = manual_dir or registry.default_manual_dir(builder)
    raise registry.DataError(
        f'{" and ".join(missing)} not found in {directory}. '
        + registry.preparation_instructions(builder, manual_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
  logging.info('Prepared %s in %s: %s', dataset, builder.data_dir,
               builder.info.splits)
  return builder


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    prepare(FLAGS.dataset, FLAGS.data_dir, FLAGS.manual_dir)
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
