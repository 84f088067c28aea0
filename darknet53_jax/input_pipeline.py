"""tensorflow-datasets input pipeline: per-process splits, tf.data
preprocessing, and batches as NumPy arrays. Knows nothing of JAX.

The train stream is a pure function of (seed, process, step): epoch e is the
process's share shuffled with a seed derived from (seed, e), and every
example's augmentation is drawn with stateless ops from (seed, its position in
the stream). Resuming at a step therefore rebuilds exactly the batches an
uninterrupted run would have seen, with no iterator state to checkpoint.
"""

import math
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from darknet53_jax import datasets  # noqa: F401  (registers our builders)

TF_DTYPES = {'float32': tf.float32, 'bfloat16': tf.bfloat16,
             'float16': tf.float16}
INTERPOLATIONS = {'bilinear': tf.image.ResizeMethod.BILINEAR,
                  'bicubic': tf.image.ResizeMethod.BICUBIC}
# Datasets that ship their data and so are prepared on first use.
EMBEDDED_DATASETS = ('sklearn_digits',)


class DataError(ValueError):
  """A dataset that is unknown, unprepared or mis-configured."""


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The tfds builder for ``config.dataset`` in ``config.data_dir``."""
  try:
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(
        f'Unknown dataset {config.dataset!r}: set config.dataset to a '
        'tensorflow-datasets name (for example imagenet2012) or '
        f'{EMBEDDED_DATASETS[0]}.') from None
  return builder


def ensure_prepared(builder: tfds.core.DatasetBuilder) -> None:
  """Prepares embedded datasets; for others, fails clearly if unprepared.

  Call on one process only; the others wait for it.
  """
  if builder.is_prepared():
    return
  if builder.name in EMBEDDED_DATASETS:
    builder.download_and_prepare()
    return
  raise DataError(
      f'Dataset {builder.name!r} is not prepared in {builder.data_dir!r}: '
      f'run `python -m darknet53_jax.prepare_data --dataset={builder.name} '
      '--data_dir=DIR` and set config.data_dir=DIR.')


def num_classes(builder: tfds.core.DatasetBuilder) -> int:
  return builder.info.features['label'].num_classes


def num_examples(builder: tfds.core.DatasetBuilder, split) -> int:
  try:
    return builder.info.splits[split].num_examples
  except KeyError:
    raise DataError(
        f'Dataset {builder.name!r} has no split {split!r}; it has '
        f'{sorted(builder.info.splits)}.') from None


def _read(builder, split) -> tf.data.Dataset:
  """Encoded images and labels, in the stored order."""
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  return ds.map(lambda ex: {'image': ex['image'],
                            'label': tf.cast(ex['label'], tf.int32)})


def _image_shape(image_bytes):
  """Height and width of an encoded image; cheap for JPEG (header only)."""
  return tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.image.extract_jpeg_shape(image_bytes)[:2],
      lambda: tf.shape(_decode(image_bytes))[:2])


def _decode(image_bytes):
  return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def _decode_and_crop(image_bytes, offset_height, offset_width, height, width):
  """Decodes only the window for JPEG (decode_and_crop_jpeg), else slices."""
  window = tf.stack([offset_height, offset_width, height, width])
  return tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3),
      lambda: tf.image.crop_to_bounding_box(
          _decode(image_bytes), offset_height, offset_width, height, width))


def _random_crop_window(shape, seed, config):
  """Inception-style crop: random area and aspect, else a centre crop."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.concat([shape, [3]], 0),
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=seed, min_object_covered=0.1,
      aspect_ratio_range=tuple(config.aspect_ratio_range),
      area_range=tuple(config.crop_area_range), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  height, width = size[0], size[1]
  # The sampler returns the whole image when all attempts fail; use the
  # largest centred square instead, as Inception preprocessing does.
  failed = tf.logical_and(tf.equal(height, shape[0]), tf.equal(width, shape[1]))
  side = tf.minimum(shape[0], shape[1])
  height = tf.where(failed, side, height)
  width = tf.where(failed, side, width)
  top = tf.where(failed, (shape[0] - side) // 2, begin[0])
  left = tf.where(failed, (shape[1] - side) // 2, begin[1])
  return top, left, height, width


def _color_jitter(image, seed, strength: float):
  """Brightness, contrast and saturation factors in [1 - s, 1 + s], as
  torchvision's ColorJitter (and the reference's RandomColorAdjust)."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  factor = lambda s: tf.random.stateless_uniform(
      [], s, 1.0 - strength, 1.0 + strength)
  image = image * factor(seeds[0])
  grey_mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
  image = grey_mean + (image - grey_mean) * factor(seeds[1])
  grey = tf.image.rgb_to_grayscale(image)
  image = grey + (image - grey) * factor(seeds[2])
  return tf.clip_by_value(image, 0.0, 255.0)


def _normalize(image, config):
  mean = tf.constant(config.mean_rgb, tf.float32) * 255.0
  std = tf.constant(config.std_rgb, tf.float32) * 255.0
  return tf.cast((image - mean) / std, TF_DTYPES[config.dtype])


def preprocess_train(image_bytes, seed, config):
  """Random-resized crop on the compressed bytes, flip, jitter, normalise."""
  crop_seed, flip_seed, jitter_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  window = _random_crop_window(_image_shape(image_bytes), crop_seed, config)
  image = _decode_and_crop(image_bytes, *window)
  image = tf.image.resize(image, [config.train_size, config.train_size],
                          method=INTERPOLATIONS[config.interpolation],
                          antialias=True)
  if config.random_flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if config.color_jitter:
    image = _color_jitter(image, jitter_seed, config.color_jitter)
  return _normalize(tf.clip_by_value(image, 0.0, 255.0), config)


def eval_resize_size(config) -> int:
  """Shorter side before the centre crop: floor(eval_size / crop_pct)."""
  return int(math.floor(config.eval_size / config.eval_crop_pct + 1e-6))


def preprocess_eval(image_bytes, config):
  """Resize the shorter side to eval_size / crop_pct, centre-crop eval_size."""
  image = tf.cast(_decode(image_bytes), tf.float32)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = eval_resize_size(config) / tf.reduce_min(shape)
  resized = tf.cast(tf.math.round(shape * scale), tf.int32)
  resized = tf.maximum(resized, config.eval_size)
  image = tf.image.resize(image, resized,
                          method=INTERPOLATIONS[config.interpolation],
                          antialias=True)
  top = (resized[0] - config.eval_size) // 2
  left = (resized[1] - config.eval_size) // 2
  image = tf.image.crop_to_bounding_box(image, top, left, config.eval_size,
                                        config.eval_size)
  return _normalize(tf.clip_by_value(image, 0.0, 255.0), config)


def _process_split(split, process_index: int, process_count: int,
                   drop_remainder: bool):
  return tfds.even_splits(split, process_count,
                          drop_remainder=drop_remainder)[process_index]


def train_steps_per_epoch(builder, config, local_batch_size: int,
                          process_count: int) -> int:
  """Full batches per epoch; every process has the same number."""
  split = _process_split(config.train_split, 0, process_count, True)
  steps = num_examples(builder, split) // local_batch_size
  if steps == 0:
    raise DataError(
        f'config.batch_size={config.batch_size} is larger than the '
        f'{config.train_split!r} split of {builder.name!r}: lower it.')
  return steps


def create_train_iterator(builder, config, local_batch_size: int,
                          start_step: int, process_index: int,
                          process_count: int) -> Iterator[dict]:
  """Endless per-process train batches, starting at global step start_step."""
  steps_per_epoch = train_steps_per_epoch(builder, config, local_batch_size,
                                          process_count)
  epoch_examples = steps_per_epoch * local_batch_size
  split = _process_split(config.train_split, process_index, process_count,
                         True)
  records = _read(builder, split)
  seed = tf.constant(config.seed, tf.int64)
  stream_id = tf.constant(process_index, tf.int64)

  def epoch(e):
    shuffled = records.shuffle(config.shuffle_buffer, seed=seed * 7919 + e,
                               reshuffle_each_iteration=False)
    positions = tf.data.Dataset.range(e * epoch_examples,
                                      (e + 1) * epoch_examples)
    return tf.data.Dataset.zip(shuffled.take(epoch_examples), positions)

  def preprocess(example, position):
    example_seed = tf.stack([seed * 65537 + stream_id, position])
    return {'image': preprocess_train(example['image'], example_seed, config),
            'label': example['label']}

  start_epoch, offset = divmod(start_step, steps_per_epoch)
  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
  ds = ds.flat_map(epoch).skip(offset * local_batch_size)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(ds))


def create_eval_dataset(builder, config, split, local_batch_size: int,
                        process_index: int, process_count: int):
  """Every example of ``split`` once, padded with mask-0 examples.

  All processes run the same number of batches: the process with the most
  examples sets it, the others pad.

  Returns:
    (iterable of per-process batches with 'image', 'label', 'mask', the
    number of batches).
  """
  parts = [_process_split(split, i, process_count, False)
           for i in range(process_count)]
  counts = [num_examples(builder, p) for p in parts]
  steps = max(1, math.ceil(max(counts) / local_batch_size))
  padding = steps * local_batch_size - counts[process_index]

  ds = _read(builder, parts[process_index]).map(
      lambda ex: {'image': preprocess_eval(ex['image'], config),
                  'label': ex['label'], 'mask': tf.constant(1, tf.int32)},
      num_parallel_calls=tf.data.AUTOTUNE)
  blank = {'image': tf.zeros([config.eval_size, config.eval_size, 3],
                             TF_DTYPES[config.dtype]),
           'label': tf.constant(0, tf.int32), 'mask': tf.constant(0, tf.int32)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)), steps
