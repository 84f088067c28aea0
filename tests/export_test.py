"""Tests for darknet53_jax.export: each export reloads and matches Flax."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from darknet53_jax import export
from darknet53_jax import model as model_lib
from darknet53_jax import predict
from tests import conftest

# (--batch_size, batch sizes to call the export with, --platforms).
BATCHES = {'fixed': (2, (2,), ('cpu',)),
           'dynamic': (None, (1, 3), export.DEFAULT_PLATFORMS)}


@pytest.fixture(scope='module')
def flax_logits(tiny_checkpoint):
  """Images -> the checkpoint's Flax logits."""
  _, model, variables = predict.load_inference_model(tiny_checkpoint)
  apply = jax.jit(model.apply)
  return lambda images: np.asarray(apply(variables, images))


def _images(batch: int) -> np.ndarray:
  return np.random.default_rng(batch).normal(
      size=(batch, 32, 32, 3)).astype(np.float32)


def _relative_difference(got, want) -> float:
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize('batching', list(BATCHES))
def test_stablehlo_reloads_and_matches_flax(tiny_checkpoint, flax_logits,
                                           tmp_path, batching):
  batch_size, batches, platforms = BATCHES[batching]
  export.export_checkpoint(tiny_checkpoint, 'stablehlo', str(tmp_path),
                           batch_size, platforms=platforms)
  exported = jax.export.deserialize(
      (tmp_path / export.STABLEHLO_FILE).read_bytes())
  assert exported.platforms == platforms
  for batch in batches:
    images = _images(batch)
    got = np.asarray(exported.call(images))
    # The same eval-mode program compiled twice: only XLA's choices of
    # kernel and fusion may differ, float32 rounding with nothing to
    # amplify it (BatchNorm applies fixed statistics).
    assert _relative_difference(got, flax_logits(images)) < 1e-5
  config = json.loads((tmp_path / export.CONFIG_FILE).read_text())
  assert config['eval_size'] == 32


@pytest.mark.parametrize('batching', list(BATCHES))
def test_saved_model_reloads_and_matches_flax(tiny_checkpoint, flax_logits,
                                              tmp_path, batching):
  batch_size, batches, platforms = BATCHES[batching]
  export.export_checkpoint(tiny_checkpoint, 'saved_model', str(tmp_path),
                           batch_size, platforms=platforms)
  loaded = tf.saved_model.load(str(tmp_path))
  for batch in batches:
    images = _images(batch)
    assert _relative_difference(loaded(images).numpy(),
                                flax_logits(images)) < 1e-5
  images = _images(batches[0])
  serving = loaded.signatures['serving_default']
  got = serving(images=tf.constant(images))['logits'].numpy()
  assert _relative_difference(got, flax_logits(images)) < 1e-5
  assert (tmp_path / export.CONFIG_FILE).exists()


def _export_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'darknet53_jax.export', *args], cwd=conftest.REPO,
      env=conftest.subprocess_env(), capture_output=True, text=True,
      check=False)


def test_cli_exports_for_any_batch_size_by_default(tiny_checkpoint,
                                                   flax_logits, tmp_path):
  result = _export_cli(f'--checkpoint={tiny_checkpoint}',
                       '--format=saved_model', f'--output={tmp_path}',
                       '--platforms=cpu')
  assert result.returncode == 0, result.stderr[-2000:]
  serving = tf.saved_model.load(str(tmp_path)).signatures['serving_default']
  for batch in (1, 3):
    images = _images(batch)
    got = serving(images=tf.constant(images))['logits'].numpy()
    assert _relative_difference(got, flax_logits(images)) < 1e-5


def test_stablehlo_export_imports_no_tensorflow(tiny_checkpoint, tmp_path):
  # Only the SavedModel format needs TensorFlow (docs/reuse.md).
  result = subprocess.run(
      [sys.executable, '-c',
       'import sys; from darknet53_jax import export; '
       f'export.export_checkpoint({tiny_checkpoint!r}, "stablehlo", '
       f'{str(tmp_path)!r}, 1); '
       "print(sorted(m for m in sys.modules if m.split('.')[0] in "
       "('tensorflow', 'tensorflow_datasets', 'keras')))"],
      cwd=conftest.REPO, env=conftest.subprocess_env(), capture_output=True,
      text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == '[]'
  assert (tmp_path / export.STABLEHLO_FILE).exists()


def test_cli_bad_input_is_one_line(tmp_path):
  result = _export_cli(f'--checkpoint={tmp_path}', '--format=stablehlo',
                       f'--output={tmp_path / "export"}')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      f'error: No checkpoint at {tmp_path}: ')
  assert 'Traceback' not in result.stderr


def test_image_size_overrides_the_eval_size(tiny_checkpoint, tmp_path):
  export.export_checkpoint(tiny_checkpoint, 'stablehlo', str(tmp_path), 1,
                           image_size=64, platforms=('cpu',))
  exported = jax.export.deserialize(
      (tmp_path / export.STABLEHLO_FILE).read_bytes())
  assert exported.in_avals[0].shape == (1, 64, 64, 3)
  assert exported.out_avals[0].shape == (1, 10)


def test_other_platforms_get_xla_convolutions():
  """A model built on CPUs exports its CPU convolutions (1x1 ones and
  Winograd's as matmuls) for CPUs, and XLA's for the other platforms."""
  model = model_lib.Darknet53(num_classes=3, width_multiplier=0.125,
                              stage_depths=(1, 1, 1, 1, 1))
  variables = conftest.random_variables(model, 32)

  def matmuls(platforms):
    exported = jax.export.deserialize(export.export_stablehlo(
        model, variables, 1, 32, platforms))
    return exported.mlir_module().count('stablehlo.dot_general')

  assert matmuls(('cuda',)) == matmuls(('tpu',)) == 1  # The classifier's.
  assert matmuls(('cpu',)) > 1


@pytest.mark.parametrize('value', ['0', '-1', 'two', ''])
def test_bad_batch_sizes_are_refused(value):
  with pytest.raises(export.ExportError, match='--batch_size'):
    export.parse_batch_size(value)


def test_bad_arguments_are_refused(tiny_checkpoint, tmp_path):
  assert export.parse_batch_size('dynamic') is None
  assert export.parse_batch_size('8') == 8
  with pytest.raises(export.ExportError, match='--format'):
    export.export_checkpoint(tiny_checkpoint, 'onnx', str(tmp_path), 1)
  with pytest.raises(export.ExportError, match='--platforms'):
    export.export_checkpoint(tiny_checkpoint, 'stablehlo', str(tmp_path), 1,
                             platforms=('gpu',))
  (tmp_path / 'old').write_text('')
  with pytest.raises(export.ExportError, match='not empty'):
    export.export_checkpoint(tiny_checkpoint, 'stablehlo', str(tmp_path), 1)
