r"""Train-step and inference throughput of Darknet-53 on synthetic data.

  python -m benchmarks.throughput [--config=configs/fake_data_benchmark.py] \
      [--image_size=N] [--batch_size=N] [--dtype=float32|bfloat16|float16] \
      [--steps=N] [--width_multiplier=X] [--json=FILE] [--config.FIELD=X]

Runs the project's sharded train step (``steps.make_train_step``) and an
eval-mode forward pass over all local devices, on batches that
``synthetic_data`` made on the devices, and prints one Markdown table:
images/s and step time (the median of ``config.benchmark_rounds`` rounds of
``--steps`` steps, after ``config.benchmark_warmup_steps``), compile time,
the FLOPs of each step as XLA counts them with its own convolutions (the
step lowered with ``cpu_matmul_convs=False``: the same count whichever
convolutions run, Winograd's fewer multiplications and oneDNN's custom
calls included) and the model FLOPs utilisation against the device's peak, peak device memory where the
runtime reports it, and the time to the first step (from the process start,
imports, initialisation and compiles included). ``--batch_size`` is global; ``--image_size`` sets the
train and the inference size. Imports no TensorFlow.
"""

import json
import os
import platform
import statistics
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
from darknet53_jax import allocator

if __name__ == '__main__':
  allocator.restart_with_fast_allocator()  # Before the slow imports below.

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
from darknet53_jax import build
from darknet53_jax import config_lib
from darknet53_jax import precision
from darknet53_jax import runtime
from darknet53_jax import sharding
from darknet53_jax import steps
from darknet53_jax import synthetic_data
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(REPO, 'configs', 'fake_data_benchmark.py'),
    'Benchmark config; fields can be overridden with --config.FIELD=VALUE.')
_IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', None, 'Train and inference image size (config: train_size '
    'and eval_size).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None,
                                   'Global batch size (config: batch_size).')
_DTYPE = flags.DEFINE_enum('dtype', None, sorted(precision.DTYPES),
                           'Compute dtype (config: dtype).')
_STEPS = flags.DEFINE_integer('steps', None,
                              'Timed steps per round (config: '
                              'benchmark_steps).')
_WIDTH = flags.DEFINE_float('width_multiplier', None,
                            'Channel multiplier (config: '
                            'model.width_multiplier).')
_JSON = flags.DEFINE_string('json', None, 'Also write the results here.')

# Dense peak FLOP/s per device: (device_kind substring, {dtype: FLOP/s}),
# the first match wins. GPU float32 is the TF32 tensor-core rate (XLA's and
# cuDNN's default for float32 convolutions on these chips).
PEAK_FLOPS = (
    ('H100 PCIe', {'bfloat16': 756e12, 'float16': 756e12, 'float32': 378e12}),
    ('H100', {'bfloat16': 989e12, 'float16': 989e12, 'float32': 494.5e12}),
    ('H200', {'bfloat16': 989e12, 'float16': 989e12, 'float32': 494.5e12}),
    ('A100', {'bfloat16': 312e12, 'float16': 312e12, 'float32': 156e12}),
    ('TPU v4', {'bfloat16': 275e12, 'float32': 275e12}),
    ('TPU v5 lite', {'bfloat16': 197e12, 'float32': 197e12}),
    ('TPU v5', {'bfloat16': 459e12, 'float32': 459e12}),
    ('TPU v6 lite', {'bfloat16': 918e12, 'float32': 918e12}),
)
# The CPU features that decide which kernels XLA and PyTorch can use.
VECTOR_EXTENSIONS = ('avx2', 'avx512f', 'avx512_bf16', 'avx512_fp16',
                     'amx_bf16', 'amx_tile')


def config_from_flags() -> ml_collections.ConfigDict:
  """The ``--config`` file with the shortcut flags applied, validated."""
  config = _CONFIG.value
  if _IMAGE_SIZE.value is not None:
    config.train_size = config.eval_size = _IMAGE_SIZE.value
  if _BATCH_SIZE.value is not None:
    config.batch_size = _BATCH_SIZE.value
  if _DTYPE.value is not None:
    config.dtype = _DTYPE.value
  if _STEPS.value is not None:
    config.benchmark_steps = _STEPS.value
  if _WIDTH.value is not None:
    config.model.width_multiplier = _WIDTH.value
  config_lib.validate(config, jax.local_device_count(), 1)
  return config


def cpu_info() -> dict[str, Any]:
  """The host CPU from /proc/cpuinfo: model name, clock and flags.

  Returns:
    ``model`` (``platform.processor()`` without /proc/cpuinfo), ``mhz``
    (``None`` if not listed), ``flags`` and ``vector_extensions``: those of
    ``VECTOR_EXTENSIONS`` that the CPU has.
  """
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      info = dict(line.split(':', 1) for line in f if ':' in line)
  except OSError:
    info = {}
  info = {key.strip(): value.strip() for key, value in info.items()}
  cpu_flags = info.get('flags', '').split()
  return {
      'model': info.get('model name') or platform.processor() or 'unknown',
      'mhz': float(info['cpu MHz']) if 'cpu MHz' in info else None,
      'flags': cpu_flags,
      'vector_extensions': [e for e in VECTOR_EXTENSIONS if e in cpu_flags]}


def describe_cpu(info: dict[str, Any]) -> str:
  """``MODEL (EXTENSIONS)``, e.g. ``AMD EPYC (avx2)``."""
  extensions = ', '.join(info['vector_extensions']) or 'no AVX2, AVX-512, AMX'
  return f'{info["model"]} ({extensions})'


def _cpu_peak_flops() -> tuple[float | None, str]:
  """Cores x clock x FMA lanes: an estimate, from /proc/cpuinfo."""
  info = cpu_info()
  if info['mhz'] is None or 'fma' not in info['flags']:
    return None, 'unknown (no clock or no FMA in /proc/cpuinfo)'
  # Two FMA pipes, each a multiply and an add on every float32 lane.
  lanes = 16 if 'avx512f' in info['flags'] else 8
  cores = len(os.sched_getaffinity(0))
  peak = cores * info['mhz'] * 1e6 * 2 * 2 * lanes
  return peak, (f'estimate: {cores} cores x {info["mhz"]:.0f} MHz x 2 FMA '
                f'pipes x {lanes} float32 lanes x 2')


def describe_device(device: jax.Device) -> str:
  """The device kind; for a CPU, its model and vector extensions."""
  if device.platform == 'cpu':
    return describe_cpu(cpu_info())
  return device.device_kind


def peak_flops(device: jax.Device, dtype: str) -> tuple[float | None, str]:
  """The device's dense peak FLOP/s for ``dtype`` and where it comes from."""
  if device.platform == 'cpu':
    return _cpu_peak_flops()
  for kind, peaks in PEAK_FLOPS:
    if kind in device.device_kind and dtype in peaks:
      return peaks[dtype], f'datasheet ({kind}, {dtype}, dense)'
  return None, f'unknown ({device.device_kind}, {dtype})'


def peak_memory_bytes(devices) -> int | None:
  """The largest ``peak_bytes_in_use`` over the devices, if reported."""
  peaks = [(d.memory_stats() or {}).get('peak_bytes_in_use')
           for d in devices]
  return None if None in peaks else max(peaks)


class JaxBenchmark:
  """The project's train step and an inference step on one synthetic batch.

  ``compile()`` first; then each ``time_*`` call runs that many steps and
  returns their wall time, the devices drained at the end.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.devices = jax.local_devices()
    self.mesh = sharding.create_mesh(self.devices)
    run = build.training(config, self.mesh, steps_per_epoch=1000)
    self.state = run.state
    # The state with XLA's convolutions: what ``flops_per_step`` counts.
    self.xla_conv_state = run.state.replace(
        apply_fn=run.model.clone(cpu_matmul_convs=False).apply)
    self.inputs = {
        'train': synthetic_data.batch(
            self.mesh, config.batch_size, config.train_size,
            config.num_classes),
        'inference': synthetic_data.batch(
            self.mesh, config.batch_size, config.eval_size,
            config.num_classes, seed=1)['image'],
    }
    self.steps = {
        'train': run.train_step,
        'inference': steps.make_predict_step(self.mesh, config),
    }

  def compile(self) -> dict[str, dict[str, float]]:
    """Compiles both steps; returns compile seconds and FLOPs per step."""
    info = {}
    for name, step in self.steps.items():
      start = time.perf_counter()
      self.steps[name] = step.lower(self.state, self.inputs[name]).compile()
      info[name] = {'compile_s': time.perf_counter() - start}
      # One device's share of the SPMD program, times the devices.
      info[name]['flops_per_step'] = step.lower(
          self.xla_conv_state, self.inputs[name]).cost_analysis()['flops'] * (
              len(self.devices))
    return info

  def time_train(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self.state, _ = self.steps['train'](self.state, self.inputs['train'])
    jax.block_until_ready(self.state)
    return time.perf_counter() - start

  def time_inference(self, steps: int) -> float:
    start = time.perf_counter()
    logits = None  # Zero steps (no warm-up) time nothing.
    for _ in range(steps):
      logits = self.steps['inference'](self.state, self.inputs['inference'])
    jax.block_until_ready(logits)
    return time.perf_counter() - start


def utilisation(flops_per_step: float, step_time_ms: float,
                peak_flops: float | None) -> float | None:
  """Achieved over peak FLOP/s (``None`` where the peak is unknown)."""
  if peak_flops is None:
    return None
  return flops_per_step / (step_time_ms / 1e3) / peak_flops


def rate(seconds: list[float],
         config: ml_collections.ConfigDict) -> dict[str, float]:
  """Images/s and step time of the median of rounds of the config's steps."""
  step_s = statistics.median(seconds) / config.benchmark_steps
  return {'images_per_s': config.batch_size / step_s,
          'step_time_ms': 1e3 * step_s}


def median_rate(time_fn, config: ml_collections.ConfigDict) -> dict[str, float]:
  """Warms up, then ``rate`` over the config's rounds of ``time_fn``."""
  time_fn(config.benchmark_warmup_steps)
  return rate([time_fn(config.benchmark_steps)
               for _ in range(config.benchmark_rounds)], config)


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Compiles and times both steps; returns every number of the table."""
  load_before = os.getloadavg()
  bench = JaxBenchmark(config)
  compiled = bench.compile()
  bench.time_train(1)
  first_step_s = runtime.seconds_since_process_start()
  device = bench.devices[0]
  peak, peak_source = peak_flops(device, config.dtype)
  cpu = cpu_info()
  results = {
      'device_kind': device.device_kind, 'platform': device.platform,
      'device': describe_device(device),
      'cpu': {key: cpu[key] for key in ('model', 'vector_extensions')},
      'num_devices': len(bench.devices), 'jax_version': jax.__version__,
      'dtype': config.dtype, 'batch_size': config.batch_size,
      'train_size': config.train_size, 'eval_size': config.eval_size,
      'width_multiplier': config.model.width_multiplier,
      'stage_depths': list(config.model.stage_depths),
      'steps': config.benchmark_steps, 'rounds': config.benchmark_rounds,
      'peak_flops_per_device': peak, 'peak_flops_source': peak_source,
      'time_to_first_step_s': first_step_s,
  }
  for name in bench.steps:
    phase = dict(compiled[name],
                 **median_rate(getattr(bench, f'time_{name}'), config))
    phase['gflop_per_image'] = phase['flops_per_step'] / config.batch_size / 1e9
    phase['mfu'] = utilisation(
        phase['flops_per_step'], phase['step_time_ms'],
        None if peak is None else peak * len(bench.devices))
    results[name] = phase
  results['peak_memory_bytes'] = peak_memory_bytes(bench.devices)
  results['load_average'] = {'before': load_before, 'after': os.getloadavg()}
  return results


def _number(value, spec: str) -> str:
  return 'n/a' if value is None else format(value, spec)


def format_table(results: dict[str, Any]) -> str:
  """The results as a Markdown table and a few lines of context."""
  rows = (('images/s', 'images_per_s', ',.1f'),
          ('step time (ms)', 'step_time_ms', '.2f'),
          ('compile time (s)', 'compile_s', '.1f'),
          ('GFLOP per image (XLA convolutions)', 'gflop_per_image', '.2f'),
          ('model FLOPs utilisation', 'mfu', '.1%'))
  lines = ['| metric | train | inference |', '| --- | ---: | ---: |']
  lines += [f'| {label} | {_number(results["train"][key], spec)} | '
            f'{_number(results["inference"][key], spec)} |'
            for label, key, spec in rows]
  memory = results['peak_memory_bytes']
  lines += [
      '',
      f'device: {results["num_devices"]} x {results["device"]} '
      f'({results["platform"]}), jax {results["jax_version"]}',
      f'config: {results["dtype"]}, global batch {results["batch_size"]}, '
      f'{results["train_size"]} px train, {results["eval_size"]} px '
      f'inference, width x{results["width_multiplier"]}, stage depths '
      f'{tuple(results["stage_depths"])}, median of {results["rounds"]} x '
      f'{results["steps"]} steps',
      f'time to the first train step: '
      f'{results["time_to_first_step_s"]:.1f} s from the process start',
      f'peak device memory: '
      f'{"n/a" if memory is None else f"{memory / 2**30:.2f} GiB"}',
      f'peak FLOP/s per device: '
      f'{_number(results["peak_flops_per_device"], ".3g")} '
      f'({results["peak_flops_source"]})',
      f'load average (1 min) before/after: '
      f'{results["load_average"]["before"][0]:.2f} / '
      f'{results["load_average"]["after"][0]:.2f}',
  ]
  return '\n'.join(lines)


def write_json(results: dict[str, Any]) -> None:
  """Writes ``results`` to ``--json`` when given."""
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(results, f, indent=2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  results = run(config_from_flags())
  print(format_table(results))
  write_json(results)


if __name__ == '__main__':
  app.run(main)
