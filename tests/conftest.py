"""Shared fixtures: tiny configs, a tiny checkpoint and the embedded digits
data, prepared once."""

import atexit
import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, 'configs', 'quickstart.py')

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Quick compiles: XLA:CPU's LLVM optimisations and its fusion emitters take
# most of the compile time of these tiny models and change no result beyond
# float32 rounding; the tests check what the programs compute, not their
# speed. Subprocesses inherit the flags (``subprocess_env``).
QUICK_COMPILE_FLAGS = ('--xla_backend_optimization_level=0 '
                       '--xla_llvm_disable_expensive_passes=true '
                       '--xla_cpu_use_fusion_emitters=false')
os.environ['XLA_FLAGS'] = ' '.join(filter(None, (
    os.environ.get('XLA_FLAGS'), QUICK_COMPILE_FLAGS)))
# Many tests compile the same tiny model: one compilation cache per test run,
# shared by its tests, the pytest-xdist workers (one run ID) and the
# subprocesses they start. Bounded, so JAX reads and writes it under a lock.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _RUN = os.environ.get('PYTEST_XDIST_TESTRUNUID', str(os.getpid()))
  _CACHE = os.path.join(tempfile.gettempdir(), f'darknet53_jax_tests_{_RUN}')
  if 'PYTEST_XDIST_WORKER' not in os.environ:  # The run's first process.
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 << 30))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402  (after the cache settings above)
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from darknet53_jax import build  # noqa: E402
from darknet53_jax import checkpoints  # noqa: E402
from darknet53_jax import config_lib  # noqa: E402
from darknet53_jax import sharding  # noqa: E402


# The widths (stem, then stages) of ``tiny_config``'s model: 1/8 of Darknet-53.
TINY_WIDTHS = (4, 8, 16, 32, 64, 128)


def tiny_config(data_dir=None):
  """The quick start shrunk to seconds: 1-block stages, 1/8 width, 2 epochs."""
  config = config_lib.load_file(QUICKSTART)
  config.data_dir = data_dir
  config.model.width_multiplier = 0.125
  config.model.stage_depths = (1, 1, 1, 1, 1)
  config.num_epochs = 2
  config.batch_size = 128
  config.checkpoint_every_epochs = 1
  config.eval_every_epochs = 1
  config.log_every_steps = 5
  # Milder crops and a faster rate than the quick start: tiny runs stay in
  # the regime where reduction order moves results by rounding only.
  config.crop_area_range = (0.6, 1.0)
  config.learning_rate = 0.1
  return config


def subprocess_env(devices: int | None = None, *,
                   optimized: bool = False) -> dict:
  """This environment for a subprocess on CPUs, with ``devices`` forced CPU
  devices if given (XLA reads the count once, at start-up).

  ``optimized`` compiles at XLA's optimisation level 1 rather than 0, for
  runs of many steps: the tiny model's train step compiled in 6.5 rather
  than 4.6 s and ran in 107 rather than 459 ms (docs/performance.md). Its
  rounding differs from level 0's, which training amplifies: compare runs
  compiled alike.
  """
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  if optimized:
    env['XLA_FLAGS'] = env['XLA_FLAGS'].replace(
        '--xla_backend_optimization_level=0',
        '--xla_backend_optimization_level=1')
  if devices is not None:
    env['XLA_FLAGS'] = (f'{env["XLA_FLAGS"]} '
                        f'--xla_force_host_platform_device_count={devices}')
  return env


def train_setup(config, devices, steps_per_epoch=10):
  """(mesh, ``build.training`` of ``config`` on ``devices``)."""
  mesh = sharding.create_mesh(devices)
  return mesh, build.training(config, mesh, steps_per_epoch)


def random_batches(config, count, seed=0, num_classes=10):
  """``count`` global batches of random uint8 images and labels."""
  rng = np.random.default_rng(seed)
  size = config.train_size
  return [{'image': rng.integers(0, 256, (config.batch_size, size, size, 3),
                                 np.uint8),
           'label': rng.integers(0, num_classes, config.batch_size)}
          for _ in range(count)]


def train_steps(config, devices, batches):
  """The params and BatchNorm statistics after training on ``batches``."""
  mesh, run = train_setup(config, devices)
  state = run.state
  for batch in batches:
    state, _ = run.train_step(state, sharding.global_batch(mesh, batch))
  return jax.device_get({'params': state.params,
                         'batch_stats': state.batch_stats})


def _paths(tree) -> list[str]:
  return [jax.tree_util.keystr(path)
          for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def assert_trees_equal(got, want) -> None:
  """The same leaf paths, not none, and bitwise-equal leaves."""
  assert _paths(got) == _paths(want)
  assert jax.tree.leaves(want), 'an empty tree proves nothing'
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(x, y)


def max_relative_difference(a, b) -> float:
  """The largest leaf-wise max |a - b| / max |b| over two pytrees of the
  same leaf paths."""
  assert _paths(a) == _paths(b)
  diffs = jax.tree.map(
      lambda x, y: float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12)),
      a, b)
  return max(jax.tree.leaves(diffs))


def main_flags(config: ml_collections.ConfigDict) -> list[str]:
  """``--config`` and the overrides that make ``main`` run ``config`` (a
  changed quick start, such as ``tiny_config``)."""
  base = config_lib.flat_config(config_lib.load_file(QUICKSTART).to_dict())
  wanted = config_lib.flat_config(config.to_dict())
  return [f'--config={QUICKSTART}'] + [
      f'--config.{key}={value}' for key, value in sorted(wanted.items())
      if base.get(key) != value]


def run_main(*args, devices: int = 1,
             timeout: int = 300) -> subprocess.CompletedProcess:
  """Runs ``main`` outside the repository (configs load from any directory)
  on ``devices`` CPU devices."""
  return subprocess.run(
      [sys.executable, '-m', 'darknet53_jax.main', *args],
      cwd=tempfile.gettempdir(), env=subprocess_env(devices),
      capture_output=True, text=True, timeout=timeout, check=False)


def random_variables(model, size: int, seed: int = 0) -> dict:
  """He-normal kernels and random BatchNorm affines and statistics, drawn
  with NumPy (jitting ``model.init`` compiles slowly on CPU)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))

  def sample(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      std = np.sqrt(2 / np.prod(leaf.shape[:-1]))
      return rng.normal(0, std, leaf.shape).astype(np.float32)
    low, high = (-0.2, 0.2) if name in ('bias', 'mean') else (0.5, 1.5)
    return rng.uniform(low, high, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(sample, abstract)


def timm_darknet53(timm, depths, widths, num_classes: int,
                   act_layer: str = 'leaky_relu'):
  """timm's darknet53 with other stage depths, widths (stem, stages) and
  activation, randomly initialised."""
  base = timm.models.cspnet.model_cfgs['darknet53']
  cfg = dataclasses.replace(
      base, act_layer=act_layer,
      stem=dataclasses.replace(base.stem, out_chs=widths[0]),
      stages=dataclasses.replace(base.stages, depth=depths,
                                 out_chs=widths[1:]))
  return timm.models.cspnet.CspNet(cfg, num_classes=num_classes)


def randomise_batch_norm(model, seed: int):
  """Random BatchNorm statistics and affine parameters in a torch model
  (timm zero-initialises some scales)."""
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(seed)
  uniform = lambda n, low, high: low + (high - low) * torch.rand(
      n, generator=generator)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        n = module.num_features
        module.running_mean.copy_(uniform(n, -0.5, 0.5))
        module.running_var.copy_(uniform(n, 0.5, 2.0))
        module.weight.copy_(uniform(n, 0.5, 1.5))
        module.bias.copy_(uniform(n, -0.2, 0.2))
  return model


def write_checkpoint(directory: str, config: ml_collections.ConfigDict,
                     step: int = 1) -> dict:
  """Saves a random model of ``config`` as a train run would; returns its
  variables."""
  model = build.create_model(config)
  variables = random_variables(model, config.eval_size)
  manager = checkpoints.CheckpointManager(directory)
  manager.save(step, variables, config)
  manager.wait()
  manager.close()
  return variables


def import_timm():
  """timm, importable beside the CPU-only torch wheel (``timm_compat``); the
  test is skipped where torch or timm cannot be imported."""
  pytest.importorskip('torch')
  from darknet53_jax import timm_compat  # pylint: disable=g-import-not-at-top
  try:
    return timm_compat.import_timm()
  except ImportError as e:
    pytest.skip(f'timm is not importable: {e}')


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory):
  """A random sklearn_digits model of ``tiny_config``, saved as a run would
  (without class names, as checkpoints before they were saved). Read it, do
  not write it."""
  directory = str(tmp_path_factory.mktemp('tiny') / 'checkpoints')
  write_checkpoint(directory, tiny_config())
  return directory


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
  """A tfds data_dir holding the prepared sklearn_digits dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  importlib.import_module('darknet53_jax.datasets')  # Registers the builders.
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('sklearn_digits', data_dir=data_dir).download_and_prepare()
  return data_dir
