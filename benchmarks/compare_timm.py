r"""Our Darknet-53 against timm's darknet53 in PyTorch, on the same device.

  python -m benchmarks.compare_timm [the flags of throughput.py] \
      [--torch_compile=true|false] [--channels_last=true|false] [--json=FILE]

Each framework runs in its own worker process (so neither's threads, memory
pools or compilers disturb the other) on the same config: device, global
batch, image sizes, precision, stage depths and widths (timm's model is
built from ``timm.models.cspnet``'s darknet53 config with ours' depths and
widths). Both train with SGD with momentum, weight decay and
label-smoothed cross-entropy on a fixed synthetic batch already on the
device, and infer in eval mode. timm runs in float32 or under autocast
(bfloat16, or float16 with a GradScaler); on a GPU by default in
channels-last layout and under ``torch.compile``, on a CPU eagerly in the
default layout.

The workers compile at the same time (their compile times overlap); then
rounds alternate between them (and which goes first), so load that comes
and goes hits both alike. Prints a Markdown table of images/s (the median
over rounds) and the ratio ours / timm for the train step and inference;
``--json`` also writes every number.
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

WORKERS = ('ours', 'timm')
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


class TimmBenchmark:
  """timm's darknet53: a train step and inference on one synthetic batch.

  The interface of ``throughput.JaxBenchmark``; ``compile()`` runs (and
  times) the first step of each, which is when ``torch.compile`` compiles.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               compile_model: bool | None, channels_last: bool | None):
    """Builds the model, optimiser and batches.

    Args:
      config: the benchmark config.
      compile_model: ``torch.compile`` the model (``None``: on a GPU).
      channels_last: channels-last layout (``None``: on a GPU).
    """
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.config = config
    self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    on_gpu = self.device.type == 'cuda'
    torch.backends.cudnn.benchmark = on_gpu  # As timm's own benchmark.
    self.options = {
        'torch_compile': on_gpu if compile_model is None else compile_model,
        'channels_last': on_gpu if channels_last is None else channels_last}
    layout = (torch.channels_last if self.options['channels_last']
              else torch.contiguous_format)
    self.model = timm_darknet53(timm_compat.import_timm(), config).to(
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
    self.scaler = torch.amp.GradScaler(self.device.type,
                                       enabled=config.dtype == 'float16')

  def _autocast(self):
    if self.config.dtype == 'float32':
      return contextlib.nullcontext()
    return self.torch.autocast(self.device.type,
                               dtype=getattr(self.torch, self.config.dtype))

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
        device=self.torch.cuda.get_device_name() if on_gpu else 'cpu',
        version=f'torch {self.torch.__version__}',
        peak_memory_bytes=(self.torch.cuda.max_memory_allocated() if on_gpu
                           else None),
        peak_flops=None)


class OursBenchmark(throughput.JaxBenchmark):
  """``throughput.JaxBenchmark`` with a worker's ``summary()``."""

  def summary(self) -> dict[str, Any]:
    peak, source = throughput.peak_flops(self.devices[0], self.config.dtype)
    return {
        'device': f'{len(self.devices)} x {self.devices[0].device_kind}',
        'version': f'jax {jax.__version__}',
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
  bench = (OursBenchmark(config) if name == 'ours' else TimmBenchmark(
      config, _TORCH_COMPILE.value, _CHANNELS_LAST.value))
  _reply(bench.compile())
  for line in sys.stdin:
    phase, steps = line.split()
    _reply({'seconds': getattr(bench, f'time_{phase}')(int(steps))})
  _reply(bench.summary())


class Worker:
  """One framework's worker process, started with this script's flags."""

  def __init__(self, name: str):
    self.name = name
    env = dict(os.environ)
    if name == 'ours':
      # Leaves the GPU memory that JAX does not preallocate to timm.
      env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.45')
    else:
      env['JAX_PLATFORMS'] = 'cpu'  # JAX only reads our model's shapes.
    self.process = subprocess.Popen(
        [sys.executable, '-m', 'benchmarks.compare_timm', *sys.argv[1:],
         f'--worker={name}'],
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
  """Starts both workers (they compile at once), then alternates rounds."""
  load_before = os.getloadavg()
  workers = [Worker(name) for name in WORKERS]
  results = {worker.name: worker.receive() for worker in workers}
  for phase in PHASES:
    seconds = {name: [] for name in WORKERS}
    for worker in workers:
      worker.time(phase, config.benchmark_warmup_steps)
    for round_index in range(config.benchmark_rounds):
      order = workers if round_index % 2 == 0 else workers[::-1]
      for worker in order:
        seconds[worker.name].append(
            worker.time(phase, config.benchmark_steps))
    for name in WORKERS:
      results[name][phase].update(throughput.rate(seconds[name], config))
      results[name][phase]['rounds_s'] = seconds[name]
  for worker in workers:
    results[worker.name].update(worker.close())
  for phase in PHASES:
    ours, timm = (results[name][phase] for name in WORKERS)
    ours['mfu'] = throughput.utilisation(
        ours['flops_per_step'], ours['step_time_ms'],
        results['ours']['peak_flops'])
    results[f'{phase}_ratio'] = ours['images_per_s'] / timm['images_per_s']
  results['config'] = {
      key: config[key] for key in (
          'dtype', 'batch_size', 'train_size', 'eval_size',
          'benchmark_steps', 'benchmark_rounds')}
  results['config'].update(
      width_multiplier=config.model.width_multiplier,
      stage_depths=list(config.model.stage_depths))
  results['load_average'] = {'before': load_before, 'after': os.getloadavg()}
  return results


def _memory(value: int | None) -> str:
  return 'n/a' if value is None else f'{value / 2**30:.2f} GiB'


def format_table(results: dict[str, Any]) -> str:
  """The comparison as a Markdown table and a few lines of context."""
  ours, timm = results['ours'], results['timm']
  lines = ['| phase | ours (images/s) | timm (images/s) | ours / timm | '
           'ours step (ms) | timm step (ms) | ours compile (s) | '
           'timm first step (s) |',
           '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  lines += [f'| {phase} | {ours[phase]["images_per_s"]:,.1f} | '
            f'{timm[phase]["images_per_s"]:,.1f} | '
            f'{results[f"{phase}_ratio"]:.2f} | '
            f'{ours[phase]["step_time_ms"]:.2f} | '
            f'{timm[phase]["step_time_ms"]:.2f} | '
            f'{ours[phase]["compile_s"]:.1f} | '
            f'{timm[phase]["compile_s"]:.1f} |' for phase in PHASES]
  config, load = results['config'], results['load_average']
  mfu = {phase: ('n/a' if ours[phase]['mfu'] is None
                 else f'{ours[phase]["mfu"]:.1%}') for phase in PHASES}
  lines += [
      '',
      f'config: {config["dtype"]}, global batch {config["batch_size"]}, '
      f'{config["train_size"]} px train, {config["eval_size"]} px inference, '
      f'width x{config["width_multiplier"]}, stage depths '
      f'{tuple(config["stage_depths"])}, median of '
      f'{config["benchmark_rounds"]} x {config["benchmark_steps"]} steps',
      f'ours: {ours["device"]}, {ours["version"]}, peak memory '
      f'{_memory(ours["peak_memory_bytes"])}, model FLOPs utilisation train '
      f'{mfu["train"]}, inference {mfu["inference"]} (peak: '
      f'{ours["peak_flops_source"]})',
      f'timm: {timm["device"]}, {timm["version"]}, torch.compile '
      f'{timm["torch_compile"]}, channels_last {timm["channels_last"]}, peak '
      f'memory {_memory(timm["peak_memory_bytes"])}',
      f'load average (1 min) before/after: {load["before"][0]:.2f} / '
      f'{load["after"][0]:.2f}',
  ]
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
