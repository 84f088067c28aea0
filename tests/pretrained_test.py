"""Tests for darknet53_jax.pretrained: ``config.init_from`` from checkpoints
and timm weights, with a new head for another number of classes."""

import jax
import numpy as np
import pytest

from darknet53_jax import checkpoints
from darknet53_jax import convert_timm
from darknet53_jax import pretrained
from darknet53_jax import train_loop
from tests import conftest


def _variables(classes: int, channels: int = 4, fill: float = 0.0) -> dict:
  return jax.tree.map(lambda shape: np.full(shape, fill, np.float32), {
      'params': {'stem': {'conv': {'kernel': (3, 3, 3, channels)}},
                 'head': {'kernel': (channels, classes),
                          'bias': (classes,)}},
      'batch_stats': {'stem': {'bn': {'mean': (channels,)}}},
  }, is_leaf=lambda x: isinstance(x, tuple))


def test_other_class_count_loads_all_but_a_new_head():
  fresh, loaded = _variables(10), _variables(1000, fill=1.0)
  variables, kept, new = pretrained.fit(loaded, fresh, 'source')
  assert sorted(new) == [('params', 'head', 'bias'),
                         ('params', 'head', 'kernel')]
  assert sorted(kept) == [('batch_stats', 'stem', 'bn', 'mean'),
                          ('params', 'stem', 'conv', 'kernel')]
  np.testing.assert_array_equal(variables['params']['stem']['conv']['kernel'],
                                1.0)
  np.testing.assert_array_equal(variables['batch_stats']['stem']['bn']['mean'],
                                1.0)
  np.testing.assert_array_equal(variables['params']['head']['kernel'],
                                np.zeros((4, 10)))


def test_same_class_count_loads_everything():
  _, kept, new = pretrained.fit(_variables(10, fill=1.0), _variables(10), 's')
  assert not new and len(kept) == 4


@pytest.mark.parametrize('loaded, message', [
    (_variables(1000, channels=8),
     "['batch_stats']['stem']['bn']['mean'] has shape (8,) there and (4,)"),
    ({'params': _variables(10)['params']},
     "['batch_stats']['stem']['bn']['mean'] has shape None there and (4,)"),
])
def test_anything_else_that_does_not_fit_is_refused(loaded, message):
  with pytest.raises(checkpoints.CheckpointError) as error:
    pretrained.fit(loaded, _variables(10), 'ckpt')
  assert str(error.value) == (
      f'ckpt does not fit this model: {message} here. Set config.model '
      '(width_multiplier, stage_depths) as in those weights.')


def test_checkpoint_of_other_classes_starts_a_fine_tune(digits_data_dir,
                                                        tmp_path, caplog):
  source_config = conftest.tiny_config()
  source_config.num_classes = 7
  source_config.model.negative_slope = 0.01
  source = conftest.write_checkpoint(str(tmp_path / 'source'), source_config)
  config = conftest.tiny_config(digits_data_dir)
  config.init_from = str(tmp_path / 'source')
  caplog.set_level('INFO', logger='absl')  # Whatever earlier tests set.
  train_loop.train_and_evaluate(config, str(tmp_path / 'run'),
                                stop_at_step=0)
  got = checkpoints.load_variables(str(tmp_path / 'run'))
  head = got['params'].pop('head')
  del source['params']['head']
  conftest.assert_trees_equal(got, source)
  assert head['kernel'].shape == (128, 10)
  log = caplog.text
  modules = ', '.join(sorted(
      [f'stage{i}_{kind}' for i in range(5) for kind in ('block0', 'down')] +
      ['stem']))
  assert (f'Initialised from {tmp_path}/source (checkpoint step 1): loaded '
          f'80 tensors (params and batch_stats) of {modules}.') in log
  assert ('New, initialised afresh: params/head/bias (10,), '
          'params/head/kernel (128, 10) (this run has 10 classes, the '
          'source 7).') in log
  assert ('was trained with leaky_relu, slope 0.01, this run uses '
          'leaky_relu, slope 0.1') in log


def test_sources_that_are_not_weights_are_refused(tmp_path):
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"init_from='\S+/absent.pth' does not exist: give "
                     'a checkpoint'):
    pretrained.load(str(tmp_path / 'absent.pth'))
  with pytest.raises(checkpoints.CheckpointError, match='No checkpoint at'):
    pretrained.load(str(tmp_path))
  garbage = tmp_path / 'weights.safetensors'
  garbage.write_bytes(b'not weights')
  with pytest.raises(convert_timm.ConversionError, match='Cannot read'):
    pretrained.load(str(garbage))


def test_main_fine_tunes_timm_weights_as_downloaded(digits_data_dir,
                                                    tmp_path):
  timm = conftest.import_timm()
  safetensors_torch = pytest.importorskip('safetensors.torch')
  # timm's darknet53 at the tiny config's width and depths: its keys and
  # file format are the download's (convert_timm_test loads the full-width
  # model); its compiles take seconds, not a minute. Two steps of a linear
  # probe.
  config = conftest.tiny_config(digits_data_dir)
  state_dict = conftest.timm_darknet53(timm, config.model.stage_depths,
                                       conftest.TINY_WIDTHS, 1000).state_dict()
  weights = tmp_path / 'model.safetensors'
  safetensors_torch.save_file(state_dict, weights)
  config.model.negative_slope = 0.01
  config.num_epochs = 1
  config.train_split = 'train[:256]'
  config.init_from = str(weights)
  config.freeze_backbone = True
  workdir = tmp_path / 'run'
  result = conftest.run_main(*conftest.main_flags(config),
                             f'--workdir={workdir}', timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  log = result.stderr
  assert f'Initialised from {weights} (timm weights): loaded 80 tensors' in log
  assert ('New, initialised afresh: params/head/bias (10,), '
          'params/head/kernel (128, 10) (this run has 10 classes, the '
          'source 1000).') in log
  assert 'was trained with' not in log  # The same activation.
  assert 'eval/num_examples=360' in log
  assert 'Best checkpoint: step 2, eval/top1 ' in log
  # The backbone and its statistics are timm's, bit for bit.
  _, want = convert_timm.load_timm_state_dict(state_dict)
  got = checkpoints.load_variables(str(workdir))
  assert got['params'].pop('head')['kernel'].shape == (128, 10)
  del want['params']['head']
  conftest.assert_trees_equal(got, want)
