"""The command-line tools' shared convention: each defines its flags only
when run (``define_flags()`` under ``__main__``), so that importing several
of them never clashes, ``--help`` lists them, and none imports TensorFlow
before its flags parsed (its import takes seconds)."""

import importlib
import subprocess
import sys

from absl import flags
import pytest

from tests import conftest

# Each tool's module and the flags it defines when run.
TOOLS = {
    'main': ('config', 'workdir', 'eval_only', 'checkpoint', 'distributed',
             'coordinator_address', 'num_processes', 'process_id',
             'local_device_ids', 'distributed_timeout'),
    'prepare_data': ('dataset', 'data_dir', 'manual_dir'),
    'convert_timm': ('input', 'output'),
    'predict': ('checkpoint',),
    'export': ('checkpoint', 'format', 'output', 'batch_size', 'image_size',
               'platforms'),
}


def test_importing_the_tools_defines_none_of_their_flags():
  for tool in TOOLS:
    importlib.import_module(f'darknet53_jax.{tool}')
  importlib.import_module('darknet53_jax.distributed')
  names = {name for tool_flags in TOOLS.values() for name in tool_flags}
  assert not names & set(flags.FLAGS)


@pytest.mark.parametrize('tool', list(TOOLS))
def test_help_lists_the_flags(tool):
  result = subprocess.run(
      [sys.executable, '-m', f'darknet53_jax.{tool}', '--help'],
      cwd=conftest.REPO, env=conftest.subprocess_env(), capture_output=True,
      text=True, timeout=120, check=False)
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  for name in TOOLS[tool]:
    assert f'--{name}:' in result.stdout or f'--[no]{name}:' in result.stdout


def test_no_tool_imports_tensorflow_before_its_flags_parsed():
  modules = ', '.join(f'darknet53_jax.{tool}' for tool in TOOLS)
  result = subprocess.run(
      [sys.executable, '-c', f'import sys, {modules}; '
       "print(sorted(m for m in sys.modules if m.split('.')[0] in "
       "('tensorflow', 'tensorflow_datasets', 'keras')))"],
      cwd=conftest.REPO, env=conftest.subprocess_env(), capture_output=True,
      text=True, timeout=120, check=True)
  assert result.stdout.strip() == '[]'
