"""Smoke tests of the benchmark scripts at tiny sizes (they time nothing).

Each script runs in a subprocess, as on the command line, with the tests'
quick compiles (``conftest.QUICK_COMPILE_FLAGS``): the numbers are not what
is tested.
"""

import json
import os
import subprocess
import sys

import pytest

from darknet53_jax import timm_compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ('--image_size=32', '--batch_size=2', '--dtype=float32',
              '--steps=2', '--width_multiplier=0.125',
              '--config.model.stage_depths=(1,0,0,0,0)',
              '--config.num_classes=10', '--config.benchmark_rounds=1',
              '--config.benchmark_warmup_steps=1')
PHASE_FIELDS = ('images_per_s', 'step_time_ms', 'compile_s')


def _run(command, **env) -> subprocess.CompletedProcess:
  return subprocess.run(command, cwd=REPO, env={**os.environ, **env},
                        capture_output=True, text=True, check=False)


@pytest.fixture(scope='module')
def timm_available():
  try:
    timm_compat.import_timm()
  except ImportError as e:
    pytest.skip(f'timm is not importable: {e}')


def test_throughput_prints_table_and_json(tmp_path):
  path = tmp_path / 'throughput.json'
  result = _run([sys.executable, '-m', 'benchmarks.throughput', *TINY_FLAGS,
                 f'--json={path}'])
  assert result.returncode == 0, result.stderr[-3000:]
  for row in ('| images/s |', '| step time (ms) |', '| compile time (s) |',
              '| GFLOP per image (XLA convolutions) |',
              '| model FLOPs utilisation |'):
    assert row in result.stdout
  assert 'time to the first train step:' in result.stdout
  results = json.loads(path.read_text())
  assert results['platform'] == 'cpu'
  # Imports, initialisation and both compiles come before it.
  assert results['time_to_first_step_s'] > results['train']['compile_s']
  assert results['batch_size'] == 2 and results['train_size'] == 32
  for phase in ('train', 'inference'):
    for field in PHASE_FIELDS + ('flops_per_step', 'mfu'):
      assert results[phase][field] > 0, (phase, field)
  # A train step does forward, backward and update: several forwards' work.
  assert results['train']['flops_per_step'] > (
      2 * results['inference']['flops_per_step'])


@pytest.mark.usefixtures('timm_available')
def test_gpu_check_small_mode_on_cpu(tmp_path):
  result = _run(['benchmarks/gpu_check.sh', str(tmp_path)], SMALL='1',
                PYTHON=sys.executable)
  assert result.returncode == 0, result.stdout[-3000:]
  summary = (tmp_path / 'summary.md').read_text()
  assert 'all checks passed: True' in summary
  assert json.loads((tmp_path / 'precision.json').read_text())['passed']
  results = json.loads((tmp_path / 'compare_32px_float32.json').read_text())
  assert results['config']['train_size'] == 32
  # On CPUs timm's best differs from its float32, NCHW, eager run.
  assert results['best_timm_run'] == 'timm_best'
  bfloat16 = {'amx_bf16', 'avx512_bf16'} & set(
      results['cpu']['vector_extensions'])
  assert results['timm_best']['dtype'] == (
      'bfloat16' if bfloat16 else 'float32')
  assert results['timm_best']['channels_last']
  assert not results['timm']['channels_last']
  for phase in ('train', 'inference'):
    assert results[f'{phase}_ratio'] > 0
    assert results[f'{phase}_ratio_best'] > 0
    for framework in ('ours', 'timm', 'timm_best'):
      for field in PHASE_FIELDS:
        assert results[framework][phase][field] > 0, (framework, phase, field)
  for row in ('| train | ours |', '| train | timm |',
              "| train | timm's best |", '| inference | ours |'):
    assert summary.count(row) == 1, row
  # The table names the CPU.
  assert summary.count(f'ours: 1 x {results["cpu"]["model"]} (') == 1


def test_conv_layers_prints_one_row_per_layer_and_the_network():
  result = _run([sys.executable, '-m', 'benchmarks.conv_layers',
                 '--batch_size=1', '--image_size=32', '--rounds=1'],
                JAX_PLATFORMS='cpu')
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [line for line in result.stdout.splitlines()
          if line.startswith('| ') and 'x' in line.split('|')[1]]
  assert len(rows) == 16
  network, = [line for line in result.stdout.splitlines()
              if line.startswith('| **network**')]
  times = [float(cell.strip('* ')) for cell in network.split('|')[3:-1]]
  assert len(times) == 6 and all(t > 0 for t in times)
