"""ImageNet through the real tfds imagenet2012 builder, on a miniature fake."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from darknet53_jax.datasets import registry
from darknet53_jax import train_loop
from tests import conftest
from tests import fake_imagenet


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
  """(the fake, its prepared data_dir)."""
  root = tmp_path_factory.mktemp('imagenet')
  fake = fake_imagenet.write(str(root / 'manual'))
  data_dir = str(root / 'tfds')
  registry.prepare('imagenet2012', data_dir, fake.manual_dir)
  return fake, data_dir


def test_unprepared_imagenet_says_what_to_download_and_run(tmp_path):
  builder = registry.builder_from_name('imagenet2012', str(tmp_path))
  with pytest.raises(registry.DataError) as error:
    registry.ensure_prepared(builder)
  message = str(error.value)
  for part in (str(tmp_path), 'ILSVRC2012_img_train.tar',
               'ILSVRC2012_img_val.tar',
               'python -m darknet53_jax.prepare_data --dataset=imagenet2012'):
    assert part in message
  assert 'Traceback' not in message


def test_prepare_names_the_missing_archive(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / fake_imagenet.TRAIN_TAR).write_bytes(b'')
  with pytest.raises(registry.DataError,
                     match=f'^{fake_imagenet.VAL_TAR} not found in {manual}'):
    registry.prepare('imagenet2012', str(tmp_path / 'tfds'), str(manual))


def test_prepare_cli_names_the_missing_archives_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'darknet53_jax.prepare_data',
       '--dataset=imagenet2012', f'--data_dir={tmp_path / "tfds"}',
       f'--manual_dir={tmp_path}'],
      cwd=conftest.REPO, env=conftest.subprocess_env(), capture_output=True,
      text=True, check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      f'error: {fake_imagenet.TRAIN_TAR} and {fake_imagenet.VAL_TAR} not '
      f'found in {tmp_path}. Download ')
  assert 'Traceback' not in result.stderr


def _examples(builder, split):
  ds = builder.as_dataset(split=split,
                          decoders={'image': tfds.decode.SkipDecoding()})
  names = builder.info.features['label'].names
  return {ex['file_name'].decode(): (names[ex['label']], ex['image'])
          for ex in tfds.as_numpy(ds)}


def _mean_colour(image_bytes):
  return tf.io.decode_image(image_bytes, channels=3).numpy().mean((0, 1))


def test_real_builder_accepts_the_fake(imagenet):
  fake, data_dir = imagenet
  builder = registry.builder_from_name('imagenet2012', data_dir)
  assert str(builder.version).startswith('5.')
  assert registry.num_classes(builder) == 1000
  assert registry.num_examples(builder, 'train') == fake.num_train

  validation = _examples(builder, 'validation')
  assert [validation[name][0] for name in sorted(validation)] == (
      fake.val_synsets)
  for name, (synset, image) in validation.items():
    if name not in fake.truncated:  # Images agree with tfds's labels.
      np.testing.assert_allclose(
          _mean_colour(image),
          fake_imagenet.class_colour(synset, name in fake.grey), atol=12)

  train = _examples(builder, 'train')
  for name in (fake_imagenet.CMYK_NAME, fake_imagenet.PNG_NAME):
    synset, image = train[name]
    assert tf.io.is_jpeg(image)  # The builder converted it to an RGB JPEG.
    np.testing.assert_allclose(_mean_colour(image),
                               fake_imagenet.class_colour(synset), atol=12)


def test_train_and_evaluate_on_imagenet(imagenet, tmp_path, caplog):
  fake, data_dir = imagenet
  config = conftest.tiny_config(data_dir)
  config.dataset = 'imagenet2012'
  config.eval_split = 'validation'
  config.num_classes = 1000
  config.train_size = config.eval_size = 32
  config.eval_crop_pct = 0.875
  config.random_flip = True
  config.color_jitter = 0.4
  config.batch_size = 8
  config.num_epochs = 1
  config.shuffle_buffer = 64
  metrics = train_loop.train_and_evaluate(config, str(tmp_path))
  assert metrics['num_examples'] == len(fake.val_synsets) - 1
  assert np.isfinite(metrics['loss'])
  assert 'validation (eval): 1 corrupt image(s) skipped' in caplog.text
