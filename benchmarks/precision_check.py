r"""bfloat16 and float16 train steps against float32, and loss scaling.

  python -m benchmarks.precision_check [the flags of throughput.py]

From one initial state and the same ``--steps`` synthetic batches (float32
images, cast by the model), trains with the project's train step in float32
(at full float32 matmul precision, so no TF32), bfloat16 and float16, and
checks that:

- every step of every dtype is finite;
- each step's loss agrees with float32's within the dtype's tolerance;
- the parameter change over the steps agrees with float32's (the L2 norm of
  the difference over the L2 norm of float32's change);
- float16's dynamic loss scale grows after finite steps (growth interval 1)
  and, started at 2**30, overflows: the step reports finite = 0, changes no
  parameter and halves the scale.

Prints a Markdown table (``--json`` writes every number) and exits with
status 1 if a check fails. ``--dtype`` is ignored.
"""

import sys
from typing import Any

from absl import app
import jax
import ml_collections
import numpy as np

from benchmarks import throughput
from darknet53_jax import build
from darknet53_jax import sharding
from darknet53_jax import synthetic_data

# Largest relative differences to float32 that pass: per-step loss, and the
# parameter change over the steps. With random images and labels the
# per-example gradients mostly cancel over the batch, so rounding errors are
# large next to their sum (docs/performance.md, gpu_check.sh step 2); the
# change's bound still catches an unscaled, missing or sign-flipped gradient
# (1 or more).
LOSS_TOLERANCE = {'bfloat16': 3e-2, 'float16': 1e-2}
UPDATE_TOLERANCE = {'bfloat16': 0.9, 'float16': 0.6}
OVERFLOW_SCALE = 2.0**30


def train_steps(config: ml_collections.ConfigDict, dtype: str,
                batches: list[dict[str, jax.Array]],
                **overrides) -> dict[str, Any]:
  """Trains from the config's seed over ``batches`` in ``dtype``.

  Args:
    config: the benchmark config (copied, not changed).
    dtype: compute dtype.
    batches: global batches, one per step.
    **overrides: further config fields to set.

  Returns:
    Per-step ``loss``, ``finite`` and ``loss_scale`` (float16 only) lists, and
    ``update``: the final minus the initial parameters.
  """
  config = config.copy_and_resolve_references()
  config.dtype = dtype
  config.update(overrides)
  mesh = sharding.create_mesh(jax.local_devices())
  # One step per epoch: the warm-up reaches the peak rate in a few steps.
  run = build.training(config, mesh, steps_per_epoch=1)
  state, step = run.state, run.train_step
  initial = jax.device_get(state.params)
  history = {'loss': [], 'finite': [], 'loss_scale': []}
  for batch in batches:
    state, metrics = step(state, batch)
    metrics = jax.device_get(metrics)
    for key in history:
      if key in metrics:
        history[key].append(float(metrics[key]))
  history['update'] = jax.tree.map(np.subtract, jax.device_get(state.params),
                                   initial)
  return history


def _norm(tree) -> float:
  """The float64 2-norm of all leaves (NumPy: no program per leaf shape)."""
  return float(np.sqrt(sum(np.sum(np.square(leaf, dtype=np.float64))
                           for leaf in jax.tree.leaves(tree))))


def relative_difference(got, want) -> float:
  """||got - want|| / ||want|| over all leaves."""
  return _norm(jax.tree.map(np.subtract, got, want)) / _norm(want)


def check(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs every check; returns the numbers and a ``passed`` flag each."""
  mesh = sharding.create_mesh(jax.local_devices())
  batches = synthetic_data.batches(mesh, config.benchmark_steps,
                                   config.batch_size, config.train_size,
                                   config.num_classes)
  with jax.default_matmul_precision('float32'):
    reference = train_steps(config, 'float32', batches)
  results = {'float32': {'losses': reference['loss'],
                         'finite_steps': sum(reference['finite'])}}
  for dtype in LOSS_TOLERANCE:
    run = train_steps(config, dtype, batches, loss_scale_growth_interval=1)
    loss_difference = max(abs(a - b) / abs(b)
                           for a, b in zip(run['loss'], reference['loss']))
    update_difference = relative_difference(run['update'],
                                             reference['update'])
    results[dtype] = {
        'losses': run['loss'], 'finite_steps': sum(run['finite']),
        'loss_difference': loss_difference,
        'update_difference': update_difference,
        'passed': (sum(run['finite']) == len(batches)
                   and loss_difference <= LOSS_TOLERANCE[dtype]
                   and update_difference <= UPDATE_TOLERANCE[dtype])}
    if dtype == 'float16':
      results[dtype]['loss_scales'] = run['loss_scale']
      results[dtype]['passed'] &= run['loss_scale'][-1] > config.loss_scale
  overflow = train_steps(config, 'float16', batches[:1],
                         loss_scale=OVERFLOW_SCALE)
  results['overflow'] = {
      'finite': overflow['finite'][0],
      'loss_scale_after': overflow['loss_scale'][0],
      'max_parameter_change': max(float(np.max(np.abs(u))) for u in
                                  jax.tree.leaves(overflow['update'])),
  }
  results['overflow']['passed'] = (
      overflow['finite'][0] == 0
      and overflow['loss_scale'][0] == OVERFLOW_SCALE / 2
      and results['overflow']['max_parameter_change'] == 0)
  results['passed'] = all(results[key]['passed']
                          for key in ('bfloat16', 'float16', 'overflow'))
  return results


def format_table(results: dict[str, Any]) -> str:
  """The checks as a Markdown table."""
  lines = ['| dtype | finite steps | max loss rel. diff | update rel. diff '
           '| tolerances | passed |',
           '| --- | ---: | ---: | ---: | --- | --- |',
           f'| float32 | {results["float32"]["finite_steps"]:.0f} | reference '
           '| reference | | |']
  lines += [f'| {dtype} | {results[dtype]["finite_steps"]:.0f} | '
            f'{results[dtype]["loss_difference"]:.2e} | '
            f'{results[dtype]["update_difference"]:.2e} | '
            f'{LOSS_TOLERANCE[dtype]:g}, {UPDATE_TOLERANCE[dtype]:g} | '
            f'{results[dtype]["passed"]} |' for dtype in LOSS_TOLERANCE]
  overflow = results['overflow']
  lines += [
      '',
      f'float16 loss scales with growth interval 1: '
      f'{results["float16"]["loss_scales"]}',
      f'float16 at loss scale 2**30: finite {overflow["finite"]:.0f}, scale '
      f'after {overflow["loss_scale_after"]:g}, largest parameter change '
      f'{overflow["max_parameter_change"]:g}: passed {overflow["passed"]}',
      f'all checks passed: {results["passed"]}',
  ]
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  results = check(throughput.config_from_flags())
  print(format_table(results))
  throughput.write_json(results)
  if not results['passed']:
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
