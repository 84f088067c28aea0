"""Tests for darknet53_jax.rand_augment_spec and its check in config_lib."""

import math
import re

import pytest

from darknet53_jax import config_defaults
from darknet53_jax import config_lib
from darknet53_jax import rand_augment_spec

Spec = rand_augment_spec.RandAugmentSpec


@pytest.mark.parametrize('notation,expected', [
    ('rand', Spec(magnitude=10, num_ops=2, magnitude_std=0.0,
                  magnitude_max=10, increasing=False, prob=0.5)),
    ('rand-m9-mstd0.5-inc1', Spec(magnitude=9, magnitude_std=0.5,
                                  increasing=True)),
    ('rand-m7-mstd0.5', Spec(magnitude=7, magnitude_std=0.5)),
    ('rand-n3-m15-mmax20-p1-inc0', Spec(magnitude=15, num_ops=3,
                                        magnitude_max=20, prob=1.0)),
    ('rand-p0.25-m0', Spec(magnitude=0, prob=0.25)),
    # timm: a std above 100 means uniform magnitudes in [0, m].
    ('rand-m9-mstd101', Spec(magnitude=9, magnitude_std=math.inf)),
    ('rand-m9-mstd100', Spec(magnitude=9, magnitude_std=100.0)),
])
def test_parses_timm_notation(notation, expected):
  assert rand_augment_spec.parse(notation) == expected


@pytest.mark.parametrize('notation,complaint', [
    ('', "start with 'rand'"),
    ('augmix-m9', "start with 'rand'"),
    ('rand-m9-', "unknown section ''"),
    ('rand-x9', "unknown section 'x9'"),
    ('rand-m', "unknown section 'm'"),
    ('rand-tweights', "unknown section 'tweights'"),
    ('rand-m9.5', "'m' takes an integer"),
    ('rand-m9-m8', "'m' is given twice"),
    ('rand-n0', "'n' must be at least 1"),
    ('rand-mmax0', "'mmax' must be at least 1"),
    ('rand-inc2', "'inc' must be 0 or 1"),
    ('rand-p1.5', "'p' must be in [0, 1]"),
])
def test_rejects_malformed_notation(notation, complaint):
  with pytest.raises(ValueError, match=re.escape(complaint)):
    rand_augment_spec.parse(notation)


def _validate(**fields):
  config = config_defaults.get_config()
  config.update(fields)
  config_lib.validate(config, 1, 1)


def test_config_accepts_defaults_and_valid_augmentations():
  _validate()
  _validate(rand_augment='rand-m9-mstd0.5-inc1', random_erasing=0.25,
            random_erasing_mode='const')


@pytest.mark.parametrize('fields,message', [
    ({'rand_augment': 'rand-m9-foo'},
     "config.rand_augment='rand-m9-foo': unknown section 'foo'. Use timm's "
     'notation'),
    ({'random_erasing': 1.5}, 'config.random_erasing=1.5: use a probability'),
    ({'random_erasing': -0.1}, 'config.random_erasing=-0.1: use a'),
    ({'random_erasing_mode': 'noise'},
     "config.random_erasing_mode='noise': use one of ('pixel', 'rand', "
     "'const')"),
])
def test_config_rejects_bad_augmentation_values_in_one_line(fields, message):
  with pytest.raises(config_lib.ConfigError) as error:
    _validate(**fields)
  assert str(error.value).startswith(message)
  assert '\n' not in str(error.value)
