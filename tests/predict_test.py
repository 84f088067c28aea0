"""Tests for darknet53_jax.predict on a tiny digits checkpoint."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from darknet53_jax import checkpoints
from darknet53_jax import image_ops
from darknet53_jax import input_pipeline
from darknet53_jax import predict
from tests import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


NAMES = [f'digit {d}' for d in range(10)]


@pytest.fixture(scope='module')
def named_checkpoint(tiny_checkpoint, tmp_path_factory):
  """``tiny_checkpoint``'s model saved with the class names ``NAMES``."""
  directory = tmp_path_factory.mktemp('named')
  manager = checkpoints.CheckpointManager(directory)
  manager.save(1, checkpoints.load_variables(tiny_checkpoint),
               checkpoints.load_config(tiny_checkpoint), class_names=NAMES)
  manager.close()
  return str(directory)


@pytest.fixture(scope='module')
def digit_png(tmp_path_factory):
  path = tmp_path_factory.mktemp('images') / 'digit.png'
  pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 1), np.uint8)
  path.write_bytes(tf.io.encode_png(pixels).numpy())
  return str(path)


def _parse(stdout: str) -> dict[str, list[tuple[float, str]]]:
  """{image: [(probability, class name), ...]} from predict's output."""
  results, current = {}, None
  for line in stdout.splitlines():
    if line.startswith('  '):
      probability, name = line.split(maxsplit=1)
      results[current].append((float(probability), name))
    else:
      current = line
      results[current] = []
  return results


def test_probabilities_are_the_models_on_eval_preprocessing(
    tiny_checkpoint, digit_png, capsys):
  assert predict.predict_files(tiny_checkpoint, [digit_png]) == 0
  printed = _parse(capsys.readouterr().out)[digit_png]
  assert checkpoints.load_class_names(tiny_checkpoint) is None
  config, model, variables = predict.load_inference_model(tiny_checkpoint)
  image = input_pipeline.eval_preprocessing(config)(
      tf.io.read_file(digit_png))
  assert image.dtype == tf.uint8
  images = image_ops.normalize(image.numpy()[None], config.mean_rgb,
                               config.std_rgb, jnp.float32)
  logits = jax.jit(model.apply)(variables, images)
  want = jax.nn.softmax(logits)[0]
  top = np.argsort(-want)[:predict.TOP_K]
  assert [name for _, name in printed] == [f'class {i}' for i in top]
  np.testing.assert_allclose([p for p, _ in printed], want[top], atol=1e-4)


def test_names_saved_with_the_checkpoint_are_printed(
    tiny_checkpoint, named_checkpoint, digit_png, capsys):
  predict.predict_files(tiny_checkpoint, [digit_png])
  by_index = _parse(capsys.readouterr().out)[digit_png]
  predict.predict_files(named_checkpoint, [digit_png])
  by_name = _parse(capsys.readouterr().out)[digit_png]
  assert by_name == [(p, NAMES[int(name.split()[1])]) for p, name in by_index]


def _predict_cli(checkpoint: str, *paths: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'darknet53_jax.predict',
       f'--checkpoint={checkpoint}', *paths],
      cwd=REPO, capture_output=True, text=True, check=False)


def test_cli_reports_bad_files_and_classifies_the_rest(
    named_checkpoint, digit_png, tmp_path):
  notes = tmp_path / 'notes.txt'
  notes.write_text('not an image')
  missing = str(tmp_path / 'missing.jpg')
  result = _predict_cli(named_checkpoint, missing, digit_png, str(notes))
  assert result.returncode == 1
  predictions = _parse(result.stdout)
  assert list(predictions) == [digit_png]
  probabilities = [p for p, _ in predictions[digit_png]]
  assert len(probabilities) == 5
  assert probabilities == sorted(probabilities, reverse=True)
  assert {name for _, name in predictions[digit_png]} <= set(NAMES)
  errors = [line for line in result.stderr.splitlines()
            if line.startswith('error: ')]
  assert errors == [
      f'error: {missing}: no such file',
      f'error: {notes}: not an image TensorFlow can decode (JPEG, PNG, GIF, '
      'BMP, WebP)',
      'error: 2 of 3 files could not be classified.',
  ]


def test_missing_checkpoint_is_one_line(tmp_path):
  result = _predict_cli(str(tmp_path), 'image.png')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: No checkpoint at {tmp_path}: give a workdir, its checkpoints/ '
      'folder or one step folder inside it.')
  assert 'Traceback' not in result.stderr


def test_ema_of_a_checkpoint_without_one_is_one_line(tiny_checkpoint):
  result = _predict_cli(tiny_checkpoint, '--ema', 'image.png')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].endswith(
      'holds no EMA variables (its run had config.ema_decay=0): drop --ema '
      'to use its live ones.')
  assert 'Traceback' not in result.stderr


def test_class_names():
  config = conftest.tiny_config()
  assert predict.class_names(config, NAMES) == NAMES
  assert predict.class_names(config) == [f'class {d}' for d in range(10)]
  config.dataset, config.num_classes = 'imagenet2012', 1000
  names = predict.class_names(config)
  assert len(names) == 1000
  assert names[0] == 'tench, Tinca tinca'
  assert names[999] == 'toilet tissue, toilet paper, bathroom tissue'
  # Not ImageNet's 1000 classes: an ImageNet variant of 200, or another
  # dataset of 1000.
  config.dataset, config.num_classes = 'imagenet_a', 200
  assert predict.class_names(config)[199] == 'class 199'
  config.dataset, config.num_classes = 'image_folder:/data', 1000
  assert predict.class_names(config)[0] == 'class 0'
