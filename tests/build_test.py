"""Tests for darknet53_jax.build."""

import jax
import ml_collections

from darknet53_jax import build
from darknet53_jax import config_defaults
from darknet53_jax import sharding
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


def _tiny_run(**overrides):
  config = conftest.tiny_config()
  config.update(num_classes=10, **overrides)
  return conftest.train_setup(config, jax.devices()[:1])


def test_an_equal_config_reuses_the_steps_with_a_fresh_state():
  mesh, first = _tiny_run()
  initial = jax.device_get(first.state.params)
  batch = sharding.global_batch(
      mesh, conftest.random_batches(conftest.tiny_config(), 1)[0])
  first.train_step(first.state, batch)  # Donates first.state.
  _, again = _tiny_run()  # An equal config, made anew.
  assert again.train_step is first.train_step
  assert again.eval_step is first.eval_step
  conftest.assert_trees_equal(jax.device_get(again.state.params), initial)
  again.train_step(again.state, batch)
  _, changed = _tiny_run(learning_rate=0.2)
  assert changed.train_step is not first.train_step


def test_runs_of_one_architecture_share_one_compiled_initialisation():
  config = conftest.tiny_config()
  config.num_classes = 7  # A model that no other test builds.
  mesh = sharding.create_mesh(jax.devices()[:1])
  compiles = build._compile_init_variables.cache_info  # pylint: disable=protected-access
  before = compiles()
  build.start_compiling_init(config, mesh)
  background = build.training(config, mesh, steps_per_epoch=3)
  assert compiles().misses == before.misses + 1
  assert not build._STARTED_INITS  # pylint: disable=protected-access
  # Other dtype, optimiser and epoch length: the same initialisation.
  config.update(dtype='bfloat16', optimizer='adamw')
  other = build.training(config, mesh, steps_per_epoch=4)
  assert compiles().misses == before.misses + 1
  assert compiles().hits == before.hits + 1
  conftest.assert_trees_equal(jax.device_get(background.state.variables()),
                              jax.device_get(other.state.variables()))
  # The background program computes what init_variables jitted here does.
  direct = jax.jit(build.init_variables, static_argnums=1)(
      jax.random.key(config.seed), build.create_model(config))
  assert conftest.max_relative_difference(
      jax.device_get(background.state.variables()),
      jax.device_get(direct)) < 1e-6
