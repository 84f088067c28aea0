"""Tests for darknet53_jax.errors."""

import pytest

from darknet53_jax import checkpoints
from darknet53_jax import config_lib
from darknet53_jax import convert_timm
from darknet53_jax import distributed
from darknet53_jax import errors
from darknet53_jax import export
from darknet53_jax import precision
from darknet53_jax import predict
from darknet53_jax.datasets import registry


@pytest.mark.parametrize('error_type', [
    checkpoints.CheckpointError, checkpoints.DamagedCheckpointError,
    convert_timm.ConversionError, distributed.DistributedError,
    export.ExportError, predict.ImageError, config_lib.ConfigError,
    registry.DataError, precision.DivergedError,
])
def test_errors_the_user_can_fix_are_user_errors(error_type):
  assert issubclass(error_type, errors.UserError)


@pytest.mark.parametrize('error, line', [
    (OSError('unreadable\n  at offset 8\n'), 'unreadable'),
    (ValueError('\n  padded  \nsecond'), 'padded'),
    (KeyError(), 'KeyError'),
])
def test_first_line(error, line):
  assert errors.first_line(error) == line
