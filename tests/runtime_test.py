"""Process-wide settings: the compilation cache, deterministic GPU ops, and
TensorFlow kept off the accelerators."""

import os
import subprocess
import sys

import ml_collections

from darknet53_jax import runtime
from tests import conftest


def _config(compilation_cache_dir=None, deterministic=False):
  return ml_collections.ConfigDict({
      'compilation_cache_dir': compilation_cache_dir,
      'deterministic': deterministic})


def test_default_cache_is_under_the_users_cache_one_folder_per_cpu():
  directory = runtime.default_compilation_cache_dir(
      {'XDG_CACHE_HOME': '/c'})
  parent, cpu = os.path.split(directory)
  assert parent == '/c/darknet53_jax/xla' and len(cpu) == 12
  assert runtime.default_compilation_cache_dir({}).startswith(
      os.path.expanduser('~/.cache/darknet53_jax/xla/'))


def test_config_then_environment_then_default_choose_the_cache():
  environ = {'JAX_COMPILATION_CACHE_DIR': '/env', 'XDG_CACHE_HOME': '/c'}
  assert runtime.compilation_cache_dir(_config('/mine'), environ) == '/mine'
  assert runtime.compilation_cache_dir(_config(''), environ) is None
  assert runtime.compilation_cache_dir(_config(), environ) == '/env'
  assert runtime.compilation_cache_dir(
      _config(), {'XDG_CACHE_HOME': '/c'}).startswith('/c/darknet53_jax/')


def test_deterministic_gpu_ops_join_the_users_xla_flags_once():
  flags = runtime.with_deterministic_gpu_ops('--xla_dump_to=/tmp/x')
  assert flags == '--xla_dump_to=/tmp/x --xla_gpu_deterministic_ops=true'
  assert runtime.with_deterministic_gpu_ops(flags) == flags
  assert runtime.with_deterministic_gpu_ops('') == (
      '--xla_gpu_deterministic_ops=true')


def test_configure_sets_the_flag_before_the_backend_starts(tmp_path):
  script = (
      'import os\n'
      'import ml_collections\n'
      'from darknet53_jax import runtime\n'
      f'runtime.configure(ml_collections.ConfigDict({{\n'
      f'    "compilation_cache_dir": "{tmp_path}", "deterministic": True}}))\n'
      'import jax\n'
      'print(os.environ["XLA_FLAGS"])\n'
      'print(jax.config.jax_compilation_cache_dir)\n')
  environ = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run([sys.executable, '-c', script], env=environ,
                          cwd=conftest.REPO, capture_output=True, text=True,
                          check=True)
  assert result.stdout.split() == ['--xla_gpu_deterministic_ops=true',
                                   str(tmp_path)]


def _import_datasets_with(set_visible_devices: str):
  """Imports the datasets in a fresh process whose
  ``tf.config.set_visible_devices`` is ``set_visible_devices`` (source
  defining that function); returns the process."""
  script = ('import tensorflow as tf\n'
            f'{set_visible_devices}\n'
            'tf.config.set_visible_devices = set_visible_devices\n'
            'from darknet53_jax.datasets import registry\n'
            'print(calls)\n')
  return subprocess.run([sys.executable, '-c', script], cwd=conftest.REPO,
                        capture_output=True, text=True, check=True)


def test_tensorflow_never_sees_a_gpu_once_the_datasets_are_imported():
  # A CPU-only TensorFlow has no GPU to hide, so record the call instead.
  result = _import_datasets_with(
      'calls = []\n'
      'def set_visible_devices(*args):\n'
      '  calls.append(args)')
  assert result.stdout.strip() == "[([], 'GPU')]"


def test_datasets_import_after_tensorflow_placed_its_devices():
  # What a GPU build of TensorFlow raises once an op has run.
  result = _import_datasets_with(
      'calls = "imported"\n'
      'def set_visible_devices(*args):\n'
      '  raise RuntimeError("Visible devices cannot be modified")')
  assert result.stdout.strip() == 'imported'
  assert 'may hold GPU memory that JAX needs' in result.stderr


def test_seconds_since_process_start_counts_from_the_process_start():
  script = ('import time\n'
            'time.sleep(1.0)\n'
            'from darknet53_jax import runtime\n'
            'print(runtime.seconds_since_process_start())\n')
  result = subprocess.run([sys.executable, '-c', script], cwd=conftest.REPO,
                          capture_output=True, text=True, check=True)
  assert 1.0 <= float(result.stdout) < 30


def test_imported_objects_leave_the_collectors_scans_later_ones_do_not():
  # In a subprocess: the freeze lasts for the process.
  script = '''
import gc
import weakref
from darknet53_jax import runtime

class Node:
  pass

def cycle():
  node = Node()
  node.self = node
  return weakref.ref(node)

def tracked(obj):
  return any(o is obj for o in gc.get_objects())

runtime.exempt_imports_from_collection()  # Collector on: nothing.
unfrozen = gc.get_freeze_count() == 0
gc.disable()  # As main does while it imports.
kept = Node()
before = cycle()  # Garbage that the freeze catches.
runtime.exempt_imports_from_collection()
after = cycle()
gc.collect()
print(unfrozen, gc.isenabled(), gc.get_freeze_count() > 0, tracked(kept),
      before() is None, after() is None)
'''
  result = subprocess.run([sys.executable, '-c', script], cwd=conftest.REPO,
                          capture_output=True, text=True, check=True)
  # Frozen objects are skipped by every collection; later ones are not.
  assert result.stdout.split() == ['True'] * 3 + ['False', 'False', 'True']
