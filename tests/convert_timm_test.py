"""Tests for darknet53_jax.convert_timm against timm's own darknet53."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from darknet53_jax import checkpoints
from darknet53_jax import convert_timm
from tests import conftest

torch = pytest.importorskip('torch')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DEPTHS = (1, 2, 1, 1, 2)
TINY_CLASSES = 7


@pytest.fixture(scope='module')
def timm():
  return conftest.import_timm()


@pytest.fixture(scope='module')
def tiny_timm_model(timm):
  """A timm darknet53 at 1/8 width with other stage depths and classes, in
  eval mode with random BatchNorm statistics."""
  model = conftest.timm_darknet53(timm, TINY_DEPTHS, conftest.TINY_WIDTHS,
                                  TINY_CLASSES)
  return conftest.randomise_batch_norm(model, seed=1).eval()


def _relative_difference(got, want) -> float:
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _assert_logits_match(timm_model, model, variables, size: int):
  images = torch.randn(2, 3, size, size,
                       generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    want = timm_model(images).numpy()
  got = np.asarray(jax.jit(model.apply)(
      variables, images.numpy().transpose(0, 2, 3, 1)))
  assert got.shape == want.shape
  # Eval mode: BatchNorm applies fixed statistics, so nothing amplifies the
  # two frameworks' float32 rounding, which differs by CPU family (oneDNN
  # and XLA pick kernels for AVX2 or AVX-512); a wrong layout, padding or
  # slope moves the logits by O(1).
  assert _relative_difference(got, want) < 1e-4


def test_full_darknet53_logits_match_timm(timm):
  timm_model = conftest.randomise_batch_norm(
      timm.create_model('darknet53', pretrained=False), seed=0).eval()
  model, variables = convert_timm.load_timm_state_dict(timm_model.state_dict())
  assert (model.num_classes, model.width_multiplier) == (1000, 1.0)
  assert tuple(model.stage_depths) == (1, 2, 8, 8, 4)
  assert model.negative_slope == 0.01
  _assert_logits_match(timm_model, model, variables, size=64)


def test_other_depths_and_widths_are_inferred(tiny_timm_model):
  model, variables = convert_timm.load_timm_state_dict(
      tiny_timm_model.state_dict())
  assert tuple(model.stage_depths) == TINY_DEPTHS
  assert model.width_multiplier == 0.125
  assert model.num_classes == TINY_CLASSES
  _assert_logits_match(tiny_timm_model, model, variables, size=32)


def test_layouts_are_transposed(tiny_timm_model):
  state = tiny_timm_model.state_dict()
  _, variables = convert_timm.load_timm_state_dict(state)
  np.testing.assert_array_equal(
      variables['params']['stage1_block1']['conv2']['conv']['kernel'],
      state['stages.1.blocks.1.conv2.conv.weight'].numpy().transpose(
          2, 3, 1, 0))
  np.testing.assert_array_equal(variables['params']['head']['kernel'],
                                state['head.fc.weight'].numpy().T)
  np.testing.assert_array_equal(
      variables['batch_stats']['stem']['bn']['var'],
      state['stem.conv1.bn.running_var'].numpy())


@pytest.mark.parametrize('edit, message', [
    (lambda s: s.pop('stages.2.conv_down.bn.running_mean'),
     '1 missing (stages.2.conv_down.bn.running_mean)'),
    (lambda s: s.update({'head.extra.weight': torch.zeros(1)}),
     '1 unexpected (head.extra.weight)'),
    (lambda s: s.update({'stem.conv1.conv.weight': torch.zeros(4, 3, 5, 5)}),
     'stem.conv1.conv.weight has shape (4, 3, 5, 5)'),
    (lambda s: s.pop('head.fc.weight'), 'Not a timm darknet53 state dict'),
])
def test_mismatched_state_dicts_are_refused(tiny_timm_model, edit, message):
  state = dict(tiny_timm_model.state_dict())
  edit(state)
  with pytest.raises(convert_timm.ConversionError, match=re.escape(message)):
    convert_timm.load_timm_state_dict(state)


def _convert_cli(weights, output) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'darknet53_jax.convert_timm',
       f'--input={weights}', f'--output={output}'],
      cwd=REPO, capture_output=True, text=True, check=False)


def test_cli_writes_a_checkpoint_that_loads(tiny_timm_model, tmp_path):
  weights = tmp_path / 'tiny.pth'
  torch.save(tiny_timm_model.state_dict(), weights)
  output = tmp_path / 'converted'
  result = _convert_cli(weights, output)
  assert result.returncode == 0, result.stderr[-2000:]

  _, want = convert_timm.load_timm_state_dict(tiny_timm_model.state_dict())
  got = checkpoints.load_variables(str(output))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  config = checkpoints.load_config(str(output))
  assert checkpoints.checkpoint_step(str(output)) == 0
  assert config.num_classes == TINY_CLASSES
  assert config.model.negative_slope == 0.01
  assert config.model.width_multiplier == 0.125
  assert tuple(config.model.stage_depths) == TINY_DEPTHS
  assert (config.eval_size, config.eval_crop_pct, config.interpolation,
          config.dtype) == (256, 0.887, 'bicubic', 'float32')

  again = _convert_cli(weights, output)
  assert again.returncode == 1
  assert again.stderr.strip().splitlines()[-1] == (
      f'error: {output} already holds a checkpoint: give a new --output '
      'directory.')
  assert 'Traceback' not in again.stderr


def test_safetensors_input_matches_torch_pickle(tiny_timm_model, tmp_path):
  safetensors_torch = pytest.importorskip('safetensors.torch')
  state = tiny_timm_model.state_dict()
  safetensors_torch.save_file(state, tmp_path / 'tiny.safetensors')
  torch.save({'state_dict': state, 'epoch': 3}, tmp_path / 'train.pth.tar')
  _, from_safetensors = convert_timm.load_timm_state_dict(
      convert_timm.read_state_dict(str(tmp_path / 'tiny.safetensors')))
  _, from_pickle = convert_timm.load_timm_state_dict(
      convert_timm.read_state_dict(str(tmp_path / 'train.pth.tar')))
  jax.tree.map(np.testing.assert_array_equal, from_safetensors, from_pickle)


def test_unreadable_files_are_refused(tmp_path):
  with pytest.raises(convert_timm.ConversionError, match='No such file'):
    convert_timm.read_state_dict(str(tmp_path / 'absent.pth'))
  garbage = tmp_path / 'garbage.safetensors'
  garbage.write_bytes(b'not a tensor file')
  with pytest.raises(convert_timm.ConversionError, match='Cannot read'):
    convert_timm.read_state_dict(str(garbage))
