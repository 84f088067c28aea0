"""The datasets a run can use: finding a dataset's tfds builder by name, its
classes and splits, the evaluation sets, and preparing the data (or saying
how to). The tf.data streams are ``input_pipeline``'s.
"""

import os

from absl import logging
import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from darknet53_jax import errors
from darknet53_jax.datasets import image_folder

# Datasets that ship their data and so are prepared on first use.
EMBEDDED_DATASETS = ('sklearn_digits',)
# Archives that must be downloaded by hand before preparing a dataset.
MANUAL_FILES = {'imagenet2012': ('ILSVRC2012_img_train.tar',
                                 'ILSVRC2012_img_val.tar')}


class DataError(errors.UserError, ValueError):
  """A dataset that is unknown, unprepared or mis-configured."""


def builder_from_name(name: str,
                      data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The builder for a tfds name (``name[:version]``) or an image folder.

  Args:
    name: a tensorflow-datasets name such as ``imagenet2012`` or
      ``imagenet2012:5.0.0``, ``sklearn_digits``, or ``image_folder:/path``
      for a folder of ``SPLIT/CLASS/image`` files.
    data_dir: where tfds keeps prepared datasets (None: its default).

  Raises:
    DataError: for an unknown name, a missing folder, or a dataset without
      an image and a class label.
  """
  if name.startswith(image_folder.PREFIX):
    root = name[len(image_folder.PREFIX):]
    try:
      builder = image_folder.ImageFolder(root_dir=root, data_dir=data_dir)
    except FileNotFoundError as e:
      raise DataError(f'Dataset {name!r}: {e}') from None
  else:
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise DataError(
          f'Unknown dataset {name!r}: use a tensorflow-datasets name (for '
          f'example imagenet2012), {EMBEDDED_DATASETS[0]}, or '
          f'{image_folder.PREFIX}/path/to/folder.') from None
  image_key, label_key = feature_keys(builder)
  features = builder.info.features
  if not (isinstance(features[image_key], tfds.features.Image)
          and isinstance(features[label_key], tfds.features.ClassLabel)):
    raise DataError(f'Dataset {name!r} is not image classification: its '
                    f'{image_key!r} and {label_key!r} features are not an '
                    'image and a class label.')
  return builder


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The builder for ``config.dataset`` in ``config.data_dir``."""
  return builder_from_name(config.dataset, config.data_dir)


def feature_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  """The (image, label) feature names: the supervised keys if plain."""
  keys = builder.info.supervised_keys
  if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys
  return 'image', 'label'


def default_manual_dir(builder: tfds.core.DatasetBuilder) -> str:
  """Where tfds looks for manual downloads when none is given."""
  return os.path.join(builder.data_dir_root, 'downloads', 'manual')


def preparation_instructions(builder: tfds.core.DatasetBuilder,
                             manual_dir: str | None = None) -> str:
  """How to prepare ``builder``'s dataset: the files it needs, the command."""
  data_dir = builder.data_dir_root
  command = ('python -m darknet53_jax.prepare_data '
             f'--dataset={builder.name} --data_dir={data_dir}')
  if builder.name in MANUAL_FILES or builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    files = ' and '.join(MANUAL_FILES.get(builder.name, ('its archives',)))
    return (f'Download {files} (see {builder.info.homepage}) into a directory '
            f'MANUAL_DIR (default {default_manual_dir(builder)}), then run '
            f'once: `{command} --manual_dir={manual_dir or "MANUAL_DIR"}` '
            f'and train with --config.data_dir={data_dir}.')
  return f'Run once: `{command}` and train with --config.data_dir={data_dir}.'


def missing_manual_files(builder: tfds.core.DatasetBuilder,
                         manual_dir: str | None) -> list[str]:
  """The files of ``MANUAL_FILES`` absent from ``manual_dir`` (or default)."""
  directory = manual_dir or default_manual_dir(builder)
  return [f for f in MANUAL_FILES.get(builder.name, ())
          if not tf.io.gfile.exists(os.path.join(directory, f))]


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
  builder = builder_from_name(dataset, data_dir)
  if builder.is_prepared():
    logging.info('%s is already prepared in %s.', dataset, builder.data_dir)
    return builder
  missing = missing_manual_files(builder, manual_dir)
  if missing:
    directory = manual_dir or default_manual_dir(builder)
    raise DataError(f'{" and ".join(missing)} not found in {directory}. '
                    + preparation_instructions(builder, manual_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
  logging.info('Prepared %s in %s: %s', dataset, builder.data_dir,
               builder.info.splits)
  return builder


def ensure_prepared(builder: tfds.core.DatasetBuilder) -> None:
  """Prepares embedded datasets and image folders; fails clearly otherwise.

  Call on one process only; the others wait for it.

  Raises:
    DataError: if the dataset is not prepared and needs a download (or the
      manual archives), with the files to fetch and the command to run.
  """
  if builder.is_prepared():
    return
  if builder.name in EMBEDDED_DATASETS or isinstance(
      builder, image_folder.ImageFolder):
    builder.download_and_prepare()
    return
  raise DataError(
      f'Dataset {builder.name!r} is not prepared in {builder.data_dir_root}. '
      + preparation_instructions(builder))


def num_classes(builder: tfds.core.DatasetBuilder) -> int:
  return builder.info.features[feature_keys(builder)[1]].num_classes


def class_names(builder: tfds.core.DatasetBuilder) -> list[str]:
  """The dataset's label names, by label index."""
  return list(builder.info.features[feature_keys(builder)[1]].names)


def num_examples(builder: tfds.core.DatasetBuilder, split) -> int:
  try:
    return builder.info.splits[split].num_examples
  except KeyError:
    raise DataError(
        f'Dataset {builder.name!r} has no split {split!r}; it has '
        f'{sorted(builder.info.splits)}.') from None


def get_eval_sets(
    config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder
) -> dict[str, tuple[tfds.core.DatasetBuilder, str]]:
  """The evaluation sets by metric prefix, the main one first.

  ``eval`` is ``(builder, config.eval_split)``; each entry ``NAME:
  (dataset, split)`` of the optional ``config.eval_sets`` adds
  ``eval_NAME``. The extra builders may still need ``ensure_prepared``.

  Raises:
    DataError: if an extra set's class count differs from ``builder``'s.
  """
  sets = {'eval': (builder, config.eval_split)}
  for name, (dataset, split) in (config.get('eval_sets') or {}).items():
    extra = builder_from_name(dataset, config.data_dir)
    if num_classes(extra) != num_classes(builder):
      raise DataError(
          f'config.eval_sets.{name}: {dataset!r} has {num_classes(extra)} '
          f'classes but {builder.name!r} has {num_classes(builder)}.')
    sets[f'eval_{name}'] = (extra, split)
  return sets
