"""Tests for darknet53_jax.build."""

import ml_collections

from darknet53_jax import build
from darknet53_jax import config_defaults
from tests import conftest


def test_a_checkpoint_config_without_newer_model_fields_builds_its_model(
    tmp_path):
  """Checkpoint configs are JSON (lists for tuples) and may predate fields."""
  config = conftest.tiny_config()
  config.num_classes = 10
  saved = config.to_dict()
  saved['model'] = {k: list(v) if isinstance(v, tuple) else v
                    for k, v in saved['model'].items()
                    if k not in ('kernel_init', 'head_init',
                                 'bn_unbiased_variance')}
  model = build.create_model(ml_collections.ConfigDict(saved))
  defaults = config_defaults.get_config().model
  assert (model.kernel_init, model.head_init, model.bn_unbiased_variance) == (
      defaults.kernel_init, defaults.head_init,
      defaults.bn_unbiased_variance)
  assert model == build.create_model(config)
