"""The tf.data streams: per-process splits, preprocessing, and batches as
NumPy arrays, from the datasets of ``datasets.registry``. Knows nothing of
JAX.

Images leave the host as uint8, with each train image's colour-jitter
factors beside it; the train and eval steps jitter and normalise them on the
devices (``image_ops``).

The train stream is a pure function of (seed, process, step): epoch e is the
process's share shuffled with a seed derived from (seed, e), and every
example's augmentation is drawn with stateless ops from (seed, its position in
the stream). Resuming at a step therefore rebuilds exactly the batches an
uninterrupted run would have seen, with no iterator state to checkpoint.

An image that cannot be decoded (corrupt or truncated) stops nothing: in a
train batch its slot is filled with a copy of a readable image of the same
batch (so batch boundaries, and resume, are unchanged); in evaluation it
becomes a blank example with mask 0, so metrics count readable images only.
Either way it is counted and logged.

Both streams run without tf.data's autotuning model (parallel maps use every
core, prefetch buffers grow as the consumer waits): with it, destroying a
stream often waited for its optimisation thread's sleep to end (up to a
minute), which kept 5 of 13 quick starts from exiting for 17-40 s more
(docs/performance.md).
"""

import functools
import math
from typing import Callable, Iterator, Sequence

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from darknet53_jax import rand_augment as rand_augment_lib
from darknet53_jax import rand_augment_spec
from darknet53_jax import random_erasing as random_erasing_lib
from darknet53_jax.datasets import registry

# The antialiasing kernels tf.image.resize uses for each interpolation
# (config_lib.INTERPOLATIONS); their names are tf.image.ResizeMethod's.
AA_KERNELS = {'bilinear': 'triangle', 'bicubic': 'keyscubic'}
# Tries at a random crop before the centre-crop fallback, as in torchvision's
# RandomResizedCrop and MindSpore's RandomCropDecodeResize.
CROP_ATTEMPTS = 10
# Per batch: how many of its images could not be decoded.
CORRUPT = 'corrupt'
# Folded into an example's seed for the optional augmentations, so that the
# crop, flip and jitter draws (and the stream with both off) stay as they
# were.
RAND_AUGMENT_STREAM = 1
RANDOM_ERASING_STREAM = 2


def _read(builder, split) -> tf.data.Dataset:
  """Encoded images and labels, in the stored order."""
  image_key, label_key = registry.feature_keys(builder)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={image_key: tfds.decode.SkipDecoding()})
  return ds.map(lambda ex: {'image': ex[image_key],
                            'label': tf.cast(ex[label_key], tf.int32)})


def _decode(image_bytes):
  return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def _random_crop_window(shape, seed, area_range, ratio_range):
  """torchvision's (and MindSpore's) RandomResizedCrop window.

  Up to CROP_ATTEMPTS tries: area uniform in ``crop_area_range`` of the
  image's, aspect ratio log-uniform in ``aspect_ratio_range``; the first that
  fits is placed uniformly at random. If none fits: a centred crop of the
  whole image, narrowed to the nearest aspect ratio in range.

  Returns:
    (top, left, height, width) as int32 scalars.
  """
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  height, width = shape[0], shape[1]
  fheight, fwidth = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  min_ratio, max_ratio = ratio_range
  area = fheight * fwidth * tf.random.stateless_uniform(
      [CROP_ATTEMPTS], area_seed, *area_range)
  ratio = tf.exp(tf.random.stateless_uniform(
      [CROP_ATTEMPTS], ratio_seed, math.log(min_ratio), math.log(max_ratio)))
  widths = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
  heights = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
  fits = ((widths > 0) & (widths <= width) & (heights > 0) &
          (heights <= height))
  first = tf.argmax(tf.cast(fits, tf.int32))

  def random_window():
    crop_height, crop_width = heights[first], widths[first]
    top = tf.random.stateless_uniform([], top_seed, 0, height - crop_height + 1,
                                      dtype=tf.int32)
    left = tf.random.stateless_uniform([], left_seed, 0,
                                       width - crop_width + 1, dtype=tf.int32)
    return top, left, crop_height, crop_width

  def centre_window():
    image_ratio = fwidth / fheight
    crop_height = tf.where(
        image_ratio < min_ratio,
        tf.cast(tf.round(fwidth / min_ratio), tf.int32), height)
    crop_width = tf.where(
        image_ratio > max_ratio,
        tf.cast(tf.round(fheight * max_ratio), tf.int32), width)
    return ((height - crop_height) // 2, (width - crop_width) // 2,
            crop_height, crop_width)

  return tf.cond(tf.reduce_any(fits), random_window, centre_window)


def _decode_random_crop(image_bytes, seed, area_range, ratio_range):
  """The random crop, decoding only its window for JPEG."""
  def jpeg():
    window = _random_crop_window(tf.image.extract_jpeg_shape(image_bytes),
                                 seed, area_range, ratio_range)
    return tf.image.decode_and_crop_jpeg(image_bytes, tf.stack(window),
                                         channels=3)

  def other():
    image = _decode(image_bytes)
    top, left, height, width = _random_crop_window(
        tf.shape(image), seed, area_range, ratio_range)
    return image[top:top + height, left:left + width]

  return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def _jitter_factors(seed, strength: float):
  """Brightness, contrast and saturation factors, uniform in 1 +- strength."""
  return tf.stack([
      tf.random.stateless_uniform([], s, 1.0 - strength, 1.0 + strength)
      for s in tf.unstack(tf.random.experimental.stateless_split(seed, 3))])


@tf.function(jit_compile=True)
def _to_uint8(image):
  """Rounds and saturates [0, 255] floats (resize overshoot) to uint8."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def preprocess_train(image_bytes, seed, *, size: int,
                     crop_area_range: tuple[float, float],
                     aspect_ratio_range: tuple[float, float],
                     interpolation: str, random_flip: bool,
                     color_jitter: float,
                     rand_augment: rand_augment_spec.RandAugmentSpec | None
                     = None, random_erasing: float = 0.0,
                     random_erasing_mode: str = 'pixel',
                     mean_rgb: Sequence[float] = (),
                     std_rgb: Sequence[float] = ()) -> dict:
  """Random-resized crop of the bytes, flip, resize, [augment]; jitter draw.

  The resize is not antialiased, as the reference's (OpenCV bilinear) and
  the Flax example's; flipping the crop before resizing it is the same as
  flipping after, and cheaper. RandAugment and random erasing (both off by
  default) change the uint8 image; the colour jitter itself and the
  normalisation run on the devices (``image_ops.normalize``).

  Args:
    image_bytes: an encoded image (JPEG, PNG, GIF or BMP).
    seed: int64 [2], the stateless seed of every random choice.
    size: the output's height and width.
    crop_area_range: the crop's area, as fractions of the image's.
    aspect_ratio_range: the crop's width / height.
    interpolation: one of ``AA_KERNELS``.
    random_flip: flip left-right with probability 0.5.
    color_jitter: the strength of the jitter factors (0: none).
    rand_augment: the RandAugment policy (None: off).
    random_erasing: the probability of erasing a rectangle (0: off).
    random_erasing_mode: one of ``random_erasing.MODES``.
    mean_rgb, std_rgb: the normalisation's, in [0, 1] units: RandAugment's
      fill colour and the colours of erased pixels.

  Returns:
    'image': uint8 [size, size, 3]; with ``color_jitter``,
    'color_jitter': float32 [3] brightness, contrast, saturation factors.
  """
  crop_seed, flip_seed, jitter_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  image = _decode_random_crop(image_bytes, crop_seed, crop_area_range,
                              aspect_ratio_range)
  if random_flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = tf.image.resize(tf.cast(image, tf.float32), [size, size],
                          method=interpolation)
  image = _to_uint8(image)
  if rand_augment:
    image = rand_augment_lib.rand_augment(
        image, tf.random.experimental.stateless_fold_in(
            seed, RAND_AUGMENT_STREAM), rand_augment, mean_rgb)
  if random_erasing:
    image = random_erasing_lib.random_erasing(
        image, tf.random.experimental.stateless_fold_in(
            seed, RANDOM_ERASING_STREAM), probability=random_erasing,
        mode=random_erasing_mode, mean_rgb=mean_rgb, std_rgb=std_rgb)
  outputs = {'image': image}
  if color_jitter:
    outputs['color_jitter'] = _jitter_factors(jitter_seed, color_jitter)
  return outputs


def train_preprocessing(config: ml_collections.ConfigDict) -> Callable:
  """``preprocess_train`` with the config's values: (bytes, seed) -> dict."""
  return functools.partial(
      preprocess_train, size=config.train_size,
      crop_area_range=tuple(config.crop_area_range),
      aspect_ratio_range=tuple(config.aspect_ratio_range),
      interpolation=config.interpolation, random_flip=config.random_flip,
      color_jitter=config.color_jitter,
      rand_augment=(rand_augment_spec.parse(config.rand_augment)
                    if config.rand_augment else None),
      random_erasing=config.random_erasing,
      random_erasing_mode=config.random_erasing_mode,
      mean_rgb=tuple(config.mean_rgb), std_rgb=tuple(config.std_rgb))


def eval_resize_size(size: int, crop_pct: float) -> int:
  """Shorter side before the centre crop: floor(size / crop_pct)."""
  return int(math.floor(size / crop_pct + 1e-6))


def preprocess_eval(image_bytes, *, size: int, crop_pct: float,
                    interpolation: str):
  """Resize the shorter side to eval_resize_size, centre-crop ``size``.

  Sizes and offsets follow torchvision's Resize(int) and CenterCrop (as timm
  evaluates): the longer side is truncated, the crop offsets rounded. The
  resize is antialiased (as PIL's) and computes the cropped window only.

  Returns:
    uint8 [size, size, 3].
  """
  image = tf.cast(_decode(image_bytes), tf.float32)
  shape = tf.shape(image)[:2]
  resized = tf.maximum(
      eval_resize_size(size, crop_pct) * shape // tf.reduce_min(shape), size)
  offset = tf.round(tf.cast(resized - size, tf.float32) / 2)
  image = tf.raw_ops.ScaleAndTranslate(
      images=image[None], size=[size, size],
      scale=tf.cast(resized, tf.float32) / tf.cast(shape, tf.float32),
      translation=-offset, kernel_type=AA_KERNELS[interpolation],
      antialias=True)[0]
  return _to_uint8(image)


def eval_interpolation(config: ml_collections.ConfigDict) -> str:
  """The eval resize's interpolation: ``config.eval_interpolation`` if set
  (configs saved before it existed lack it), else the train crops'."""
  return config.get('eval_interpolation') or config.interpolation


def eval_preprocessing(config: ml_collections.ConfigDict) -> Callable:
  """``preprocess_eval`` with the config's eval protocol: bytes -> uint8."""
  return functools.partial(preprocess_eval, size=config.eval_size,
                           crop_pct=config.eval_crop_pct,
                           interpolation=eval_interpolation(config))


def _map_in_batches(ds: tf.data.Dataset, fn: Callable, batch_size: int,
                    drop_remainder: bool) -> tf.data.Dataset:
  """Maps ``fn`` over batches of ``ds``'s elements, dropping failures.

  An element where ``fn`` fails (a corrupt image) is left out of its batch
  rather than stopping the pipeline.

  Returns:
    Per batch: (the outputs that succeeded, stacked; their slots in the
    batch, int32 [n]; the batch's element count).
  """
  def process(batch):
    count = tf.shape(tf.nest.flatten(batch)[0])[0]
    done = tf.data.Dataset.from_tensor_slices((batch, tf.range(count))).map(
        lambda element, slot: (fn(element), slot),
        num_parallel_calls=tf.data.AUTOTUNE).ignore_errors().batch(batch_size)
    # If every element failed, `done` is empty: yield zero rows instead.
    none = tf.nest.map_structure(
        lambda spec: tf.zeros([0] + spec.shape[1:].as_list(), spec.dtype),
        done.element_spec)
    return done.concatenate(tf.data.Dataset.from_tensors(none)).take(1).map(
        lambda rows, slots: (rows, slots, count))

  # Two batches in flight, so that one's stragglers overlap the next.
  return ds.batch(batch_size, drop_remainder=drop_remainder).interleave(
      process, cycle_length=2, num_parallel_calls=2, deterministic=True)


def _prefetched(ds: tf.data.Dataset) -> tf.data.Dataset:
  """``ds`` prefetched, its options set as the module docstring says."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _fill_train_batch(rows, slots, count):
  """A full batch: each failed slot gets a copy of a readable row, in turn."""
  readable = tf.size(slots)
  check = tf.debugging.assert_positive(
      readable, message='Every image of a train batch failed to decode: the '
      'dataset is unreadable.')
  with tf.control_dependencies([check]):
    index = tf.range(count)
    present = tf.scatter_nd(slots[:, None], tf.ones_like(slots), [count]) > 0
    row = tf.scatter_nd(slots[:, None], tf.range(readable), [count])
    source = tf.where(present, row, index % readable)
  return {**tf.nest.map_structure(lambda x: tf.gather(x, source), rows),
          CORRUPT: count - readable}


def _fill_eval_batch(rows, slots, count, batch_size: int):
  """A full batch: failed and missing slots are zeros with mask 0."""
  scatter = lambda x: tf.scatter_nd(slots[:, None], x,
                                    [batch_size] + x.shape[1:].as_list())
  return {**tf.nest.map_structure(scatter, rows),
          'mask': scatter(tf.ones_like(slots)),
          CORRUPT: count - tf.size(slots)}


class Batches:
  """Per-process NumPy batches, stripped of their CORRUPT counts.

  Attributes:
    num_corrupt: the corrupt images met in the current (or last) pass;
      each is logged.
  """

  def __init__(self, ds: tf.data.Dataset, description: str, handling: str,
               first_step: int = 0):
    """Wraps ``ds``.

    Args:
      ds: batches with a CORRUPT count.
      description: names the stream in log messages.
      handling: what became of corrupt images, for log messages.
      first_step: the index of the first batch, for log messages.
    """
    self._ds = ds
    self._description = description
    self._handling = handling
    self._first_step = first_step
    self.num_corrupt = 0

  def __iter__(self) -> Iterator[dict]:
    self.num_corrupt = 0
    for step, batch in enumerate(tfds.as_numpy(self._ds), self._first_step):
      corrupt = int(batch.pop(CORRUPT))
      if corrupt:
        self.num_corrupt += corrupt
        logging.log_every_n_seconds(
            logging.WARNING, '%s: %d corrupt image(s) in batch %d, %s (%d so '
            'far on this process).', 60, self._description, corrupt, step,
            self._handling, self.num_corrupt)
      yield batch
    if self.num_corrupt:
      logging.warning('%s: %d corrupt image(s) skipped on this process, %s.',
                      self._description, self.num_corrupt, self._handling)


def _process_split(split, process_index: int, process_count: int,
                   drop_remainder: bool):
  return tfds.even_splits(split, process_count,
                          drop_remainder=drop_remainder)[process_index]


def train_steps_per_epoch(builder, config, local_batch_size: int,
                          process_count: int) -> int:
  """Full batches per epoch; every process has the same number."""
  split = _process_split(config.train_split, 0, process_count, True)
  steps = registry.num_examples(builder, split) // local_batch_size
  if steps == 0:
    raise registry.DataError(
        f'config.batch_size={config.batch_size} is larger than the '
        f'{config.train_split!r} split of {builder.name!r}: lower it.')
  return steps


def create_train_iterator(builder, config, local_batch_size: int,
                          start_step: int, process_index: int,
                          process_count: int) -> Iterator[dict]:
  """Endless per-process train batches, starting at global step start_step.

  A corrupt image's slot is filled with a copy of another image (and label)
  of its batch; the count is logged.
  """
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
    return tf.data.Dataset.zip(shuffled.take(epoch_examples), positions).map(
        lambda example, position: {**example, 'position': position})

  augment = train_preprocessing(config)

  def preprocess(example):
    example_seed = tf.stack([seed * 65537 + stream_id, example['position']])
    return {**augment(example['image'], example_seed),
            'label': example['label']}

  start_epoch, offset = divmod(start_step, steps_per_epoch)
  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
  ds = ds.flat_map(epoch).skip(offset * local_batch_size)
  ds = _map_in_batches(ds, preprocess, local_batch_size, drop_remainder=True)
  ds = _prefetched(ds.map(_fill_train_batch))
  batches = Batches(ds, f'{builder.name} {config.train_split} (train)',
                    'replaced by copies of readable images of their batch',
                    start_step)
  return iter(batches)


def create_eval_dataset(builder, config, split, local_batch_size: int,
                        process_index: int, process_count: int):
  """Every example of ``split`` once, padded with mask-0 examples.

  All processes run the same number of batches: the process with the most
  examples sets it, the others pad. A corrupt image becomes a mask-0 blank,
  so metrics count the readable images; ``Batches.num_corrupt`` and the log
  say how many were skipped.

  Returns:
    (``Batches`` of per-process batches with 'image', 'label', 'mask', the
    number of batches).
  """
  parts = [_process_split(split, i, process_count, False)
           for i in range(process_count)]
  counts = [registry.num_examples(builder, p) for p in parts]
  steps = max(1, math.ceil(max(counts) / local_batch_size))
  padding = steps - math.ceil(counts[process_index] / local_batch_size)

  resize_and_crop = eval_preprocessing(config)

  def preprocess(example):
    return {'image': resize_and_crop(example['image']),
            'label': example['label']}

  ds = _map_in_batches(_read(builder, parts[process_index]), preprocess,
                       local_batch_size, drop_remainder=False)
  ds = ds.map(lambda *batch: _fill_eval_batch(*batch, local_batch_size))
  blank = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype),
                                ds.element_spec)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
  return Batches(_prefetched(ds),
                 f'{builder.name} {split} (eval)',
                 'masked out of the metrics'), steps
