r"""Our Darknet-53 against timm's darknet53 in PyTorch, on the same device.

  python -m benchmarks.compare_timm [the flags of throughput.py] \
      [--torch_compile=true|false] [--channels_last=true|false] [--json=FILE]

Each run works in its own worker process (so no framework's threads, memory
pools or compilers disturb another's) on the same config: device, global
batch, image sizes, stage depths and widths (timm's model is built from
``timm.models.cspnet``'s darknet53 config with ours' depths and widths).
Each trains with SGD with momentum, weight decay and label-smoothed
cross-entropy on a fixed synthetic batch already on the device, and infers
in eval mode. The runs:

- ``ours``: the config's dtype;
- ``timm``: the same precision (float32, or autocast to bfloat16, or to
  float16 with a GradScaler); channels-last and ``torch.compile`` by
  default on a GPU, eager in the default layout on a CPU
  (``--channels_last``, ``--torch_compile``);
- ``timm_best``: timm's fastest configuration for the device
  (``best_timm_options``), run only where it differs from ``timm``'s.

The workers compile at the same time (their compile times overlap); then
each round times every worker, the order rotating from round to round, so
load that comes and goes hits all alike. Prints a Markdown table of each
run's images/s (the median over rounds) and the ratio ours / run for the
train step and inference, naming the device (the CPU's model and vector
extensions); ``--json`` also writes every number.
"""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags

# pylint: disable=g-import-not-at-top,wrong-import-position
from darknet53_jax import allocator

if __name__ == '__main__':
  # Before the slow imports below. Both workers inherit the allocator.
  allocator.restart_with_fast_allocator()

import jax
import jax.numpy as jnp
import ml_collections

from benchmarks import throughput
from darknet53_jax import build
from darknet53_jax import timm_compat
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
_TORCH_COMPILE = flags.DEFINE_boolean(
    'torch_compile', None, "torch.compile timm's model (default: on a GPU).")
_CHANNELS_LAST = flags.DEFINE_boolean(
    'channels_last', None, 'Run timm in channels-last layout (default: on a '
    'GPU).')
_WORKER = flags.DEFINE_enum('worker', None, ('ours', 'timm'),
                            'Internal: serve one framework on stdin/stdout.')
_TIMM_OPTIONS = flags.DEFINE_string(
    'timm_options', None, "Internal: a timm worker's options, as JSON.")

RUN_LABELS = {'ours': 'ours', 'timm': 'timm', 'timm_best': "timm's best"}
PHASES = ('train', 'inference')
REPLY = 'BENCHMARK '  # Prefixes the workers' protocol lines on stdout.


def _darknet53_widths(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Our model's stem and stage widths, read off its parameter shapes."""
  model = build.create_model(config)
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))['params']
  names = ['stem'] + [f'stage{s}_down'
                      for s in range(len(config.model.stage_depths))]
  return tuple(params[name]['conv']['kernel'].shape[-1] for name in names)


def timm_darknet53(timm, config: ml_collections.ConfigDict):
  """timm's darknet53 with the config's stage depths, widths and classes."""
  stem, *widths = _darknet53_widths(config)
  base = timm.models.cspnet.model_cfgs['darknet53']
  cfg = dataclasses.replace(
      base, stem=dataclasses.replace(base.stem, out_chs=stem),
      stages=dataclasses.replace(
          base.stages, depth=tuple(config.model.stage_depths),
          out_chs=tuple(widths)))
  return timm.models.cspnet.CspNet(cfg, num_classes=config.num_classes)


def same_precision_timm_options(dtype: str, on_gpu: bool,
                                channels_last: bool | None,
                                torch_compile: bool | None) -> dict[str, Any]:
  """The ``timm`` run: ``dtype``; layout and compile as given, else on GPUs."""
  return {
      'dtype': dtype,
      'channels_last': on_gpu if channels_last is None else channels_last,
      'torch_compile': on_gpu if torch_compile is None else torch_compile}


def best_timm_options(dtype: str, on_gpu: bool,
                      cpu_flags: list[str]) -> dict[str, Any]:
  """timm's fastest configuration for the device (the ``timm_best`` run).

  GPUs: autocast to 16 bits (``dtype`` if it is 16 bits, else bfloat16),
  channels-last, ``torch.compile``. CPUs with BF16 instructions (AMX-BF16 or
  AVX512-BF16, which oneDNN uses on channels-last convolutions): bfloat16
  autocast, channels-last. Other CPUs would convert bfloat16 to float32
  around every operation: float32, channels-last (the faster layout there,
  docs/performance.md). CPUs run eagerly.

  Args:
    dtype: our compute dtype.
    on_gpu: whether timm runs on a GPU.
    cpu_flags: the host CPU's flags (``throughput.cpu_info()``).
  """
  if on_gpu:
    return {'dtype': 'bfloat16' if dtype == 'float32' else dtype,
            'channels_last': True, 'torch_compile': True}
  bfloat16 = not {'amx_bf16', 'avx512_bf16'}.isdisjoint(cpu_flags)
  return {'dtype': 'bfloat16' if bfloat16 else 'float32',
          'channels_last': True, 'torch_compile': False}


def timm_runs(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """The timm runs' options: ``timm``, and ``timm_best`` if it differs."""
  import torch  # pylint: disable=g-import-not-at-top
  on_gpu = torch.cuda.is_available()  # Initialises no CUDA context.
  runs = {'timm': same_precision_timm_options(
      config.dtype, on_gpu, _CHANNELS_LAST.value, _TORCH_COMPILE.value)}
  best = best_timm_options(config.dtype, on_gpu,
                           throughput.cpu_info()['flags'])
  if best != runs['timm']:
    runs['timm_best'] = best
  return runs


class TimmBenchmark:
  """timm's darknet53: a train step and inference on one synthetic batch.

  The interface of ``throughput.JaxBenchmark``; ``compile()`` runs (and
  times) the first step of each, which is when ``torch.compile`` compiles.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               options: dict[str, Any]):
    """Builds the model, optimiser and batches.

    Args:
      config: the benchmark config.
      options: ``dtype`` (float32, or the autocast dtype), ``channels_last``
        and ``torch_compile``.
    """
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.timm = timm_compat.import_timm()
    self.config = config
    self.options = options
    self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    # As timm's own benchmark.
    torch.backends.cudnn.benchmark = self.device.type == 'cuda'
    layout = (torch.channels_last if options['channels_last']
              else torch.contiguous_format)
    self.model = timm_darknet53(self.timm, config).to(
        self.device, memory_format=layout)
    self.forward = (torch.compile(self.model) if self.options['torch_compile']
                    else self.model)
    generator = torch.Generator().manual_seed(config.seed)
    batch = lambda size: torch.randn(
        config.batch_size, 3, size, size, generator=generator).to(
            self.device, memory_format=layout)
    self.train_images = batch(config.train_size)
    self.images = batch(config.eval_size)
    self.labels = torch.randint(0, config.num_classes, (config.batch_size,),
                                generator=generator).to(self.device)
    self.optimizer = torch.optim.SGD(
        self.model.parameters(), lr=config.learning_rate,
        momentum=config.momentum, weight_decay=config.weight_decay)
    self.loss_fn = torch.nn.CrossEntropyLoss(
        label_smoothing=config.label_smoothing)
    self.scaler = torch.amp.GradScaler(
        self.device.type, enabled=options['dtype'] == 'float16')

  def _autocast(self):
    if self.options['dtype'] == 'float32':
      return contextlib.nullcontext()
    return self.torch.autocast(
        self.device.type, dtype=getattr(self.torch, self.options['dtype']))

  def _synchronize(self) -> None:
    if self.device.type == 'cuda':
      self.torch.cuda.synchronize()

  def compile(self) -> dict[str, dict[str, float]]:
    return {phase: {'compile_s': getattr(self, f'time_{phase}')(1)}
            for phase in PHASES}

  def time_train(self, steps: int) -> float:
    self.model.train()
    start = time.perf_counter()
    for _ in range(steps):
      with self._autocast():
        loss = self.loss_fn(self.forward(self.train_images), self.labels)
      self.optimizer.zero_grad(set_to_none=True)
      self.scaler.scale(loss).backward()
      self.scaler.step(self.optimizer)
      self.scaler.update()
    self._synchronize()
    return time.perf_counter() - start

  def time_inference(self, steps: int) -> float:
    self.model.eval()
    start = time.perf_counter()
    with self.torch.inference_mode(), self._autocast():
      for _ in range(steps):
        self.forward(self.images)
    self._synchronize()
    return time.perf_counter() - start

  def summary(self) -> dict[str, Any]:
    on_gpu = self.device.type == 'cuda'
    return dict(
        self.options,
        device=(self.torch.cuda.get_device_name() if on_gpu else
                throughput.describe_cpu(throughput.cpu_info())),
        version=(f'torch {self.torch.__version__}, timm '
                 f'{self.timm.__version__}'),
        peak_memory_bytes=(self.torch.cuda.max_memory_allocated() if on_gpu
                           else None),
        peak_flops=None)


class OursBenchmark(throughput.JaxBenchmark):
  """``throughput.JaxBenchmark`` with a worker's ``summary()``."""

  def summary(self) -> dict[str, Any]:
    peak, source = throughput.peak_flops(self.devices[0], self.config.dtype)
    return {
        'device': (f'{len(self.devices)} x '
                   f'{throughput.describe_device(self.devices[0])}'),
        'version': f'jax {jax.__version__}',
        'dtype': self.config.dtype,
        'peak_memory_bytes': throughput.peak_memory_bytes(self.devices),
        'peak_flops': None if peak is None else peak * len(self.devices),
        'peak_flops_source': source}


def _reply(message: dict[str, Any]) -> None:
  print(REPLY + json.dumps(message), flush=True)


def serve(name: str, config: ml_collections.ConfigDict) -> None:
  """A worker: compiles, then answers 'PHASE STEPS' lines until stdin ends.

  Replies, one line each: the compile info, the seconds of each request,
  and at the end the benchmark's ``summary()``.
  """
  bench = (OursBenchmark(config) if name == 'ours' else
           TimmBenchmark(config, json.loads(_TIMM_OPTIONS.value)))
  _reply(bench.compile())
  for line in sys.stdin:
    phase, steps = line.split()
    _reply({'seconds': getattr(bench, f'time_{phase}')(int(steps))})
  _reply(bench.summary())


class Worker:
  """One run's worker process, started with this script's flags."""

  def __init__(self, name: str, timm_options: dict[str, Any] | None = None):
    """Starts it.

    Args:
      name: the run, a key of ``RUN_LABELS``.
      timm_options: a timm run's ``TimmBenchmark`` options; ``None`` for
        ours.
    """
    self.name = name
    env = dict(os.environ)
    if timm_options is None:
      # Leaves the GPU memory that JAX does not preallocate to timm.
      env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.45')
      worker_flags = ['--worker=ours']
    else:
      env['JAX_PLATFORMS'] = 'cpu'  # JAX only reads our model's shapes.
      worker_flags = ['--worker=timm',
                      f'--timm_options={json.dumps(timm_options)}']
    self.process = subprocess.Popen(
        [sys.executable, '-m', 'benchmarks.compare_timm', *sys.argv[1:],
         *worker_flags],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

  def receive(self) -> dict[str, Any]:
    """The next reply; the worker's other output goes on to stderr."""
    for line in self.process.stdout:
      if line.startswith(REPLY):
        return json.loads(line[len(REPLY):])
      sys.stderr.write(line)
    raise RuntimeError(f'The {self.name} worker exited with status '
                       f'{self.process.wait()}.')

  def time(self, phase: str, steps: int) -> float:
    self.process.stdin.write(f'{phase} {steps}\n')
    self.process.stdin.flush()
    return self.receive()['seconds']

  def close(self) -> dict[str, Any]:
    """Ends the worker; returns its summary."""
    self.process.stdin.close()
    summary = self.receive()
    self.process.wait()
    return summary


def compare(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Starts the workers (they compile at once), then times rounds."""
  load_before = os.getloadavg()
  workers = [Worker('ours')]
  workers += [Worker(name, options)
              for name, options in timm_runs(config).items()]
  results = {worker.name: worker.receive() for worker in workers}
  for phase in PHASES:
    seconds = {worker.name: [] for worker in workers}
    for worker in workers:
      worker.time(phase, config.benchmark_warmup_steps)
    for round_index in range(config.benchmark_rounds):
      first = round_index % len(workers)
      for worker in workers[first:] + workers[:first]:
        seconds[worker.name].append(
            worker.time(phase, config.benchmark_steps))
    for name, rounds in seconds.items():
      results[name][phase].update(throughput.rate(rounds, config))
      results[name][phase]['rounds_s'] = rounds
  for worker in workers:
    results[worker.name].update(worker.close())
  ours = results['ours']
  results['best_timm_run'] = 'timm_best' if 'timm_best' in results else 'timm'
  for phase in PHASES:
    ours[phase]['mfu'] = throughput.utilisation(
        ours[phase]['flops_per_step'], ours[phase]['step_time_ms'],
        ours['peak_flops'])
    for key, name in (('ratio', 'timm'),
                      ('ratio_best', results['best_timm_run'])):
      results[f'{phase}_{key}'] = (ours[phase]['images_per_s'] /
                                   results[name][phase]['images_per_s'])
  results['config'] = {
      key: config[key] for key in (
          'dtype', 'batch_size', 'train_size', 'eval_size',
          'benchmark_steps', 'benchmark_rounds')}
  results['config'].update(
      width_multiplier=config.model.width_multiplier,
      stage_depths=list(config.model.stage_depths))
  cpu = throughput.cpu_info()
  results['cpu'] = {key: cpu[key] for key in ('model', 'vector_extensions')}
  results['load_average'] = {'before': load_before, 'after': os.getloadavg()}
  return results


def _memory(value: int | None) -> str:
  return 'n/a' if value is None else f'{value / 2**30:.2f} GiB'


def _options(run: dict[str, Any]) -> str:
  """A run's precision, layout and compiler, e.g. 'float32, NCHW, eager'."""
  if 'channels_last' not in run:
    return f'{run["dtype"]}, NHWC, XLA'
  dtype = run['dtype'] if run['dtype'] == 'float32' else (
      f'{run["dtype"]} autocast')
  return ', '.join((dtype,
                    'channels-last' if run['channels_last'] else 'NCHW',
                    'torch.compile' if run['torch_compile'] else 'eager'))


def format_table(results: dict[str, Any]) -> str:
  """The comparison as a Markdown table and a few lines of context."""
  runs = [name for name in RUN_LABELS if name in results]
  labels = dict(RUN_LABELS)
  if results['best_timm_run'] == 'timm':
    labels['timm'] = 'timm (its best here)'
  ours = results['ours']
  lines = ['| phase | run | precision, layout, compiler | images/s | '
           'step (ms) | compile or first step (s) | ours / run |',
           '| --- | --- | --- | ---: | ---: | ---: | ---: |']
  for phase in PHASES:
    for name in runs:
      run = results[name][phase]
      ratio = ('' if name == 'ours' else
               f'{ours[phase]["images_per_s"] / run["images_per_s"]:.2f}')
      lines.append(
          f'| {phase} | {labels[name]} | {_options(results[name])} | '
          f'{run["images_per_s"]:,.1f} | {run["step_time_ms"]:,.2f} | '
          f'{run["compile_s"]:.1f} | {ratio} |')
  config, load = results['config'], results['load_average']
  mfu = {phase: ('n/a' if ours[phase]['mfu'] is None
                 else f'{ours[phase]["mfu"]:.1%}') for phase in PHASES}
  lines += [
      '',
      f'ours / timm\'s best: train {results["train_ratio_best"]:.2f}, '
      f'inference {results["inference_ratio_best"]:.2f}',
      f'config: {config["dtype"]}, global batch {config["batch_size"]}, '
      f'{config["train_size"]} px train, {config["eval_size"]} px inference, '
      f'width x{config["width_multiplier"]}, stage depths '
      f'{tuple(config["stage_depths"])}, median of '
      f'{config["benchmark_rounds"]} x {config["benchmark_steps"]} steps',
      f'ours: {ours["device"]}, {ours["version"]}, peak memory '
      f'{_memory(ours["peak_memory_bytes"])}, model FLOPs utilisation train '
      f'{mfu["train"]}, inference {mfu["inference"]} (peak: '
      f'{ours["peak_flops_source"]})',
  ]
  lines += [f'{labels[name]}: {results[name]["device"]}, '
            f'{results[name]["version"]}, peak memory '
            f'{_memory(results[name]["peak_memory_bytes"])}'
            for name in runs[1:]]
  lines.append(f'load average (1 min) before/after: {load["before"][0]:.2f} '
               f'/ {load["after"][0]:.2f}')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _WORKER.value:
    serve(_WORKER.value, throughput.config_from_flags())
    return
  # This process only orchestrates: the accelerator is left to the workers.
  jax.config.update('jax_platforms', 'cpu')
  results = compare(throughput.config_from_flags())
  print(format_table(results))
  throughput.write_json(results)


if __name__ == '__main__':
  app.run(main)
