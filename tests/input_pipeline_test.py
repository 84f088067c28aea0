"""Tests for darknet53_jax.input_pipeline (and the image-folder builder)."""

import collections
import hashlib
import itertools

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from darknet53_jax import config_defaults
from darknet53_jax import config_lib
from darknet53_jax import input_pipeline
from darknet53_jax.datasets import registry
from tests import conftest


def _config(data_dir, size=16):
  config = conftest.tiny_config(data_dir)
  config.train_size = config.eval_size = size
  config.train_split = 'test'  # 360 images: small epochs keep tests fast.
  return config


def _fingerprints(batches):
  """Multiset of (label, image hash) over the mask-1 rows of ``batches``."""
  return collections.Counter(
      (int(label), hashlib.sha1(image.tobytes()).hexdigest())
      for batch in batches
      for image, label, mask in zip(batch['image'], batch['label'],
                                    batch['mask']) if mask)


@pytest.mark.parametrize('process_count', [2, 3])
def test_eval_covers_every_example_exactly_once(digits_data_dir,
                                                process_count):
  config = _config(digits_data_dir)
  builder = registry.get_builder(config)
  whole, _ = input_pipeline.create_eval_dataset(builder, config, 'test', 64, 0,
                                                1)
  expected = _fingerprints(whole)
  assert sum(expected.values()) == 360

  shares, steps = [], set()
  for index in range(process_count):
    batches, num_steps = input_pipeline.create_eval_dataset(
        builder, config, 'test', 64, index, process_count)
    batches = list(batches)
    assert len(batches) == num_steps
    steps.add(num_steps)
    shares.append(_fingerprints(batches))
  assert len(steps) == 1  # Every process runs the same number of batches.
  assert sum(shares, collections.Counter()) == expected
  assert sum(sum(s.values()) for s in shares) == 360


def _train_batches(config, start_step, count, process_index=0,
                   process_count=1, batch_size=32):
  builder = registry.get_builder(config)
  iterator = input_pipeline.create_train_iterator(
      builder, config, batch_size, start_step, process_index, process_count)
  return list(itertools.islice(iterator, count))


AUGMENTED = {'rand_augment': 'rand-m9-mstd0.5-inc1', 'random_erasing': 0.5}


@pytest.mark.parametrize('process_index,process_count,augmentations', [
    (0, 1, {}), (1, 2, {}), (1, 2, AUGMENTED)])
def test_resumed_train_stream_is_bitwise_identical(digits_data_dir,
                                                   process_index,
                                                   process_count,
                                                   augmentations):
  config = _config(digits_data_dir)
  config.update(augmentations)
  builder = registry.get_builder(config)
  steps_per_epoch = input_pipeline.train_steps_per_epoch(builder, config, 32,
                                                         process_count)
  resume = steps_per_epoch - 1  # The resumed run crosses an epoch boundary.
  full = _train_batches(config, 0, resume + 3, process_index, process_count)
  resumed = _train_batches(config, resume, 3, process_index, process_count)
  for a, b in zip(full[resume:], resumed, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  # Epochs are shuffled differently.
  assert not np.array_equal(full[0]['label'], full[steps_per_epoch]['label'])
  if augmentations:  # The same examples, augmented.
    plain = _train_batches(_config(digits_data_dir), resume, 1, process_index,
                           process_count)[0]
    np.testing.assert_array_equal(plain['label'], resumed[0]['label'])
    changed = [not np.array_equal(a, b)
               for a, b in zip(plain['image'], resumed[0]['image'])]
    assert 0.7 < np.mean(changed) < 1


def test_seeds_give_different_streams(digits_data_dir):
  config = _config(digits_data_dir)
  first = _train_batches(config, 0, 1)[0]
  config.seed = 1
  other_seed = _train_batches(config, 0, 1)[0]
  assert not np.array_equal(first['label'], other_seed['label'])
  assert not np.array_equal(first['image'], other_seed['image'])


def test_train_processes_read_disjoint_even_shares(digits_data_dir):
  config = _config(digits_data_dir, size=8)
  # No augmentation: each train image is its source image.
  config.crop_area_range = config.aspect_ratio_range = (1.0, 1.0)
  config.random_flip, config.color_jitter = False, 0.0
  builder = registry.get_builder(config)
  whole, _ = input_pipeline.create_eval_dataset(builder, config, 'test', 128,
                                                0, 1)
  available = _fingerprints(whole)
  steps = input_pipeline.train_steps_per_epoch(builder, config, 32, 2)
  shares = []
  for index in range(2):
    batches = _train_batches(config, 0, steps, index, 2)
    shares.append(_fingerprints(
        {**b, 'mask': np.ones_like(b['label'])} for b in batches))
    assert sum(shares[-1].values()) == steps * 32
  both = shares[0] + shares[1]
  assert both & available == both  # Together, no example twice.


def test_preprocess_train_is_seeded_uint8_with_jitter_factors():
  config = config_defaults.get_config()
  config.train_size = 64
  image = tf.io.encode_jpeg(tf.random.stateless_uniform(
      [75, 100, 3], [0, 0], 0, 256, tf.int32).numpy().astype(np.uint8))
  seed = tf.constant([3, 4], tf.int64)
  augment = input_pipeline.train_preprocessing(config)
  a, b, c = augment(image, seed), augment(image, seed), augment(image, seed + 1)
  assert a['image'].shape == (64, 64, 3) and a['image'].dtype == tf.uint8
  assert a['color_jitter'].shape == (3,)
  assert all(0.6 <= f <= 1.4 for f in a['color_jitter'].numpy())
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a[key], c[key])
  config.color_jitter = 0.0
  assert set(input_pipeline.train_preprocessing(config)(image, seed)) == {
      'image'}


def _unchanged_preprocess_train(image_bytes, seed, config):
  """``preprocess_train`` as it was before RandAugment and random erasing
  (commit 42f5329), from its parts."""
  # pylint: disable=protected-access
  crop_seed, flip_seed, jitter_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  image = input_pipeline._decode_random_crop(
      image_bytes, crop_seed, config.crop_area_range,
      config.aspect_ratio_range)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = tf.image.resize(tf.cast(image, tf.float32), [config.train_size] * 2,
                          method=config.interpolation)
  return {'image': input_pipeline._to_uint8(image),
          'color_jitter': input_pipeline._jitter_factors(jitter_seed,
                                                         config.color_jitter)}


def _encoded_images():
  """A JPEG and a PNG of random pixels."""
  rng = np.random.default_rng(5)
  return [tf.io.encode_jpeg(rng.integers(0, 256, (75, 100, 3), np.uint8)),
          tf.io.encode_png(rng.integers(0, 256, (50, 40, 3), np.uint8))]


def test_preprocess_train_without_augmentations_is_unchanged_bitwise():
  config = config_defaults.get_config()
  config.train_size = 32
  augment = input_pipeline.train_preprocessing(config)
  for image in _encoded_images():
    for i in range(8):
      seed = tf.constant([i, 11 * i + 2], tf.int64)
      out, expected = augment(image, seed), _unchanged_preprocess_train(
          image, seed, config)
      assert set(out) == set(expected)
      for key in out:
        np.testing.assert_array_equal(out[key], expected[key])


def test_augmentations_keep_the_crop_flip_and_jitter_draws():
  config = config_defaults.get_config()
  config.train_size = 32
  plain = input_pipeline.train_preprocessing(config)
  config.rand_augment = 'rand-m9-p0'  # Draws, but applies nothing.
  config.random_erasing = 1.0
  augmented = input_pipeline.train_preprocessing(config)
  for image in _encoded_images():
    for i in range(4):
      seed = tf.constant([i, 5], tf.int64)
      a, b = plain(image, seed), augmented(image, seed)
      np.testing.assert_array_equal(a['color_jitter'], b['color_jitter'])
      # The same crop, but for one erased rectangle.
      changed = (a['image'] != b['image']).numpy().any(-1)
      assert 0.01 < changed.mean() < 0.4
      rows, columns = np.nonzero(changed)
      box = changed[rows.min():rows.max() + 1, columns.min():columns.max() + 1]
      assert box.mean() > 0.9  # Noise may hit a pixel's own colour.


def test_random_crop_window_follows_torchvision():
  ranges = ((0.08, 1.0), (3 / 4, 4 / 3))  # The reference's.
  crop_window = input_pipeline._random_crop_window  # pylint: disable=protected-access
  windows = tf.data.Dataset.range(300).map(lambda i: tf.stack(crop_window(
      tf.constant([375, 500]), tf.stack([i, i]), *ranges)))
  top, left, height, width = np.array(list(windows.as_numpy_iterator())).T
  assert (top >= 0).all() and (top + height <= 375).all()
  assert (left >= 0).all() and (left + width <= 500).all()
  area = height * width / (375 * 500)
  assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
  assert area.min() < 0.15 and area.max() > 0.8  # The whole range is used.
  ratio = width / height
  assert ratio.min() > 0.75 - 0.05 and ratio.max() < 4 / 3 + 0.05
  # Nothing fits a 20x400 strip: the fallback is a centred 20x27 crop.
  window = crop_window(tf.constant([20, 400]), tf.constant([0, 0], tf.int64),
                       *ranges)
  assert [int(x) for x in window] == [0, (400 - 27) // 2, 20, 27]


def test_every_interpolation_the_config_allows_has_a_kernel():
  assert set(input_pipeline.AA_KERNELS) == set(config_lib.INTERPOLATIONS)


@pytest.mark.parametrize('eval_size,crop_pct,expected', [
    (256, 256 / 292, 292),  # The MindSpore reference.
    (256, 0.887, 288),  # timm's darknet53.c2ns_in1k.
    (224, 0.875, 256),  # The Inception / Flax convention.
    (32, 1.0, 32),  # The quick start.
])
def test_eval_resize_size(eval_size, crop_pct, expected):
  assert input_pipeline.eval_resize_size(eval_size, crop_pct) == expected


@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic'])
def test_eval_resizes_shorter_side_and_crops_the_centre(interpolation):
  config = config_defaults.get_config()
  config.eval_size, config.eval_crop_pct = 64, 0.8  # Resize to 80, crop 64.
  config.interpolation = interpolation
  # Red is the column index of a 200x400 image, green the row index.
  rows, columns = np.meshgrid(np.arange(200), np.arange(400), indexing='ij')
  image = np.stack([columns * 255 / 399, rows * 255 / 199, np.zeros_like(rows)],
                   -1).round().astype(np.uint8)
  out = input_pipeline.eval_preprocessing(config)(
      tf.io.encode_png(image)).numpy()
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  out = out.astype(np.float32)
  # 200x400 -> 80x160; the crop starts at row 8 and column 48, and each
  # output pixel spans 2.5 source pixels.
  source = lambda start, i: (start + i + 0.5) * 2.5 - 0.5
  for i in (0, 31, 63):
    np.testing.assert_allclose(out[32, i, 0], source(48, i) * 255 / 399,
                               atol=1.5)
    np.testing.assert_allclose(out[i, 32, 1], source(8, i) * 255 / 199,
                               atol=1.5)


@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic'])
@pytest.mark.parametrize('height,width', [(375, 500), (500, 333), (17, 300)])
def test_eval_equals_resize_then_centre_crop(interpolation, height, width):
  config = config_defaults.get_config()
  config.interpolation = interpolation
  image = tf.random.stateless_uniform([height, width, 3], [1, 2], 0, 256,
                                      tf.int32)
  out = input_pipeline.eval_preprocessing(config)(
      tf.io.encode_png(tf.cast(image, tf.uint8)))
  # torchvision's Resize(292): shorter side 292, longer side truncated.
  short = min(height, width)
  size = [292 * height // short, 292 * width // short]
  resized = tf.image.resize(tf.cast(image, tf.float32), size,
                            method=interpolation, antialias=True)
  top, left = (round((s - 256) / 2) for s in size)
  expected = tf.clip_by_value(tf.round(resized[top:top + 256, left:left + 256]),
                              0, 255)
  assert out.dtype == tf.uint8
  # Up to one level where float32 rounding lands differently on a .5.
  np.testing.assert_allclose(tf.cast(out, tf.float32), expected, atol=1.0)
  assert np.mean(tf.cast(out, tf.float32) == expected) > 0.999


def _write_image_folder(root, corrupt=True):
  """train/ and val/ with classes cat and dog, PNG and JPEG files."""
  rng = np.random.default_rng(0)
  for split, count in (('train', 6), ('val', 3)):
    for label, colour in (('cat', 60), ('dog', 200)):
      folder = root / split / label
      folder.mkdir(parents=True)
      for i in range(count):
        pixels = np.clip(colour + rng.integers(-9, 10, (30, 40, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(
            folder / f'{i}.{"png" if i % 2 else "jpg"}')
  if corrupt:
    (root / 'train' / 'cat' / 'corrupt.jpg').write_bytes(b'not an image')
    data = (root / 'train' / 'dog' / '0.jpg').read_bytes()
    (root / 'train' / 'dog' / 'truncated.jpg').write_bytes(data[:150])
    (root / 'val' / 'dog' / 'corrupt.png').write_bytes(b'\x89PNG broken')


def test_image_folder_with_corrupt_images(tmp_path, caplog):
  _write_image_folder(tmp_path / 'images')
  config = _config(str(tmp_path / 'tfds'))
  config.dataset = f'image_folder:{tmp_path / "images"}'
  config.train_split, config.eval_split = 'train', 'validation'
  builder = registry.get_builder(config)
  registry.ensure_prepared(builder)
  assert registry.num_classes(builder) == 2
  assert builder.info.features['label'].names == ['cat', 'dog']
  assert registry.num_examples(builder, 'train') == 14
  assert registry.num_examples(builder, 'validation') == 7

  # Train: the batch holds all 14 images; the 2 corrupt ones are replaced by
  # copies of readable ones, so no blank image remains.
  (batch,) = _train_batches(config, 0, 1, batch_size=14)
  assert np.abs(batch['image']).reshape(14, -1).max(1).min() > 0
  # (The per-batch warning is rate-limited process-wide, so an earlier test
  # may have used it up; the eval count below is always logged.)

  batches, _ = input_pipeline.create_eval_dataset(builder, config,
                                                  'validation', 4, 0, 1)
  assert sum(int(b['mask'].sum()) for b in batches) == 6
  assert batches.num_corrupt == 1
  assert '1 corrupt image(s) skipped' in caplog.text


def test_image_folder_classes_survive_the_folder(tmp_path):
  """Once prepared, the dataset no longer needs the source folder."""
  _write_image_folder(tmp_path / 'images', corrupt=False)
  name = f'image_folder:{tmp_path / "images"}'
  registry.ensure_prepared(
      registry.builder_from_name(name, str(tmp_path / 'tfds')))
  for path in sorted((tmp_path / 'images').rglob('*'), reverse=True):
    path.unlink() if path.is_file() else path.rmdir()
  builder = registry.builder_from_name(name, str(tmp_path / 'tfds'))
  assert builder.is_prepared()
  assert builder.info.features['label'].names == ['cat', 'dog']


def test_unknown_or_missing_datasets_are_data_errors(tmp_path):
  with pytest.raises(registry.DataError, match='Unknown dataset'):
    registry.builder_from_name('no_such_dataset', str(tmp_path))
  with pytest.raises(registry.DataError, match='No image folder'):
    registry.builder_from_name(f'image_folder:{tmp_path}/missing',
                                     str(tmp_path))
  builder = registry.builder_from_name('mnist', str(tmp_path))
  with pytest.raises(registry.DataError,
                     match='python -m darknet53_jax.prepare_data '
                     '--dataset=mnist'):
    registry.ensure_prepared(builder)


def test_eval_sets(digits_data_dir, tmp_path):
  config = _config(digits_data_dir)
  builder = registry.get_builder(config)
  config.eval_sets = {'train': ('sklearn_digits', 'train')}
  sets = registry.get_eval_sets(config, builder)
  assert list(sets) == ['eval', 'eval_train']
  assert sets['eval'] == (builder, 'test')
  assert sets['eval_train'][1] == 'train'
  _write_image_folder(tmp_path / 'images', corrupt=False)
  config.eval_sets = {'folder': (f'image_folder:{tmp_path / "images"}',
                                 'validation')}
  with pytest.raises(registry.DataError, match='has 2 classes'):
    registry.get_eval_sets(config, builder)


def test_streams_run_without_the_autotuning_model(digits_data_dir,
                                                  monkeypatch):
  # Its optimisation thread made destroying a finished stream wait for up
  # to a minute (the module docstring).
  config = _config(digits_data_dir)
  builder = registry.get_builder(config)
  streams = []

  class RecordingBatches(input_pipeline.Batches):

    def __init__(self, ds, *args, **kwargs):
      streams.append(ds)
      super().__init__(ds, *args, **kwargs)

  monkeypatch.setattr(input_pipeline, 'Batches', RecordingBatches)
  next(input_pipeline.create_train_iterator(builder, config, 32, 0, 0, 1))
  input_pipeline.create_eval_dataset(builder, config, 'test', 32, 0, 1)
  assert len(streams) == 2
  assert [ds.options().autotune.enabled for ds in streams] == [False, False]
