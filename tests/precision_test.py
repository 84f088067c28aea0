"""Tests for darknet53_jax.precision's non-finite test."""

import jax
import numpy as np
import pytest

from darknet53_jax import precision


def _grads():
  """A gradient tree like the model's: kernels, vectors and a scalar."""
  rng = np.random.default_rng(0)
  return {'conv': {'kernel': rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
          'bn': {'scale': rng.normal(size=(4,)).astype(np.float32),
                 'bias': rng.normal(size=(4,)).astype(np.float32)},
          'head': {'kernel': rng.normal(size=(4, 3)).astype(np.float32),
                   'bias': rng.normal(size=(3,)).astype(np.float32)},
          'temperature': np.float32(0.5)}


@pytest.mark.parametrize('value', [np.nan, np.inf, -np.inf])
def test_one_non_finite_value_anywhere_is_found(value):
  all_finite = jax.jit(precision.all_finite)
  assert bool(all_finite(np.float32(1.0), _grads()))
  assert not bool(all_finite(np.float32(value), _grads()))
  for path, leaf in jax.tree_util.tree_leaves_with_path(_grads()):
    grads = _grads()
    bad = np.array(leaf)
    bad.flat[bad.size - 1] = value
    grads = jax.tree_util.tree_map_with_path(
        lambda p, x, path=path, bad=bad: bad if p == path else x, grads)
    assert not bool(all_finite(np.float32(1.0), grads)), (
        jax.tree_util.keystr(path))
