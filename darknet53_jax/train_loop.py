"""The train-and-evaluate loop and checkpoint evaluation.

Ties the input pipeline, the run that ``build`` assembles, checkpoints and
metric writers together; every process runs the same code on its own share
of the data.
"""

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from jax.experimental import multihost_utils

from darknet53_jax import build
from darknet53_jax import checkpoints
from darknet53_jax import config_lib
from darknet53_jax import input_pipeline
from darknet53_jax.datasets import registry
from darknet53_jax import precision
from darknet53_jax import preemption
from darknet53_jax import pretrained
from darknet53_jax import runtime
from darknet53_jax import sharding
from darknet53_jax import steps

BEST = 'best'  # evaluate_checkpoint's name for the workdir's best checkpoint.
EMA_SUFFIX = '_ema'  # Of the EMA's eval metrics: eval_ema/*.


def _prepare_data(config):
  """The train builder and the eval sets (``registry.get_eval_sets``),
  prepared by process 0 while the others wait."""
  builder = registry.get_builder(config)
  if jax.process_index() == 0:
    for eval_builder, _ in registry.get_eval_sets(
        config, builder).values():
      registry.ensure_prepared(eval_builder)
  multihost_utils.sync_global_devices('data prepared')
  # Builders made before process 0 prepared their data do not see it.
  builder = registry.get_builder(config)
  eval_sets = registry.get_eval_sets(config, builder)
  for eval_builder, _ in eval_sets.values():
    registry.ensure_prepared(eval_builder)
  return builder, eval_sets


def _resolve_num_classes(config, builder) -> ml_collections.ConfigDict:
  """``config``, with ``num_classes`` 0 replaced by the dataset's count.

  Raises:
    ConfigError: a non-zero ``num_classes`` differs from the dataset's.
  """
  dataset_classes = registry.num_classes(builder)
  if config.num_classes == dataset_classes:
    return config
  if config.num_classes:
    raise config_lib.ConfigError(
        f'config.num_classes={config.num_classes} but {config.dataset!r} has '
        f'{dataset_classes} classes: set --config.num_classes='
        f'{dataset_classes} (or 0, the dataset\'s count).')
  config = config.copy_and_resolve_references()
  config.num_classes = dataset_classes
  return config


def evaluate(state, eval_step, mesh, builder, config,
             split: str) -> dict[str, float]:
  """Loss, top-1 and top-5 over every example of ``split`` exactly once."""
  local_batch = config.batch_size // jax.process_count()
  batches, _ = input_pipeline.create_eval_dataset(
      builder, config, split, local_batch, jax.process_index(),
      jax.process_count())
  totals = None
  for batch in sharding.device_prefetch(iter(batches), mesh):
    sums = eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['num_examples'])
  return {'loss': float(totals['loss']) / count,
          'top1': float(totals['top1']) / count,
          'top5': float(totals['top5']) / count,
          'num_examples': count}


def _evaluate_all(state, eval_step, mesh, eval_sets, config, writer,
                  step: int, prefix_suffix: str = '') -> dict[str, float]:
  """Evaluates and writes every eval set, each as ``PREFIX{prefix_suffix}/*``;
  returns the main set's metrics."""
  results = {}
  for prefix, (builder, split) in eval_sets.items():
    results[prefix] = evaluate(state, eval_step, mesh, builder, config, split)
    _write_eval(writer, step, results[prefix], prefix + prefix_suffix)
  return results['eval']


def _evaluate_live_and_ema(state, eval_step, mesh, eval_sets, config, writer,
                           step: int) -> dict[str, float]:
  """``_evaluate_all`` of the live variables and, if the run keeps one, of
  their EMA (as ``eval_ema/*``, ``eval_NAME_ema/*``); returns the live
  variables' main metrics."""
  metrics = _evaluate_all(state, eval_step, mesh, eval_sets, config, writer,
                          step)
  if state.ema is not None:
    _evaluate_all(state.ema_state(), eval_step, mesh, eval_sets, config,
                  writer, step, EMA_SUFFIX)
  return metrics


def _write_eval(writer, step: int, metrics: dict[str, float],
                prefix: str) -> None:
  writer.write_scalars(step, {f'{prefix}/{k}': v for k, v in metrics.items()})
  logging.info('%s at step %d: top1 %.4f, top5 %.4f, loss %.4f on %d '
               'examples', prefix, step, metrics['top1'], metrics['top5'],
               metrics['loss'], metrics['num_examples'])


def _create_writer(workdir: str) -> metric_writers.MetricWriter:
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)


def _setup(config: ml_collections.ConfigDict, workdir: str):
  """Validates the config and workdir, and prepares the data.

  Returns:
    (the config with ``num_classes`` 0 resolved to the dataset's class
    count, the train builder, the eval sets, the mesh).
  """
  config_lib.validate(config, jax.device_count(), jax.process_count())
  config_lib.check_workdir_writable(workdir)
  builder, eval_sets = _prepare_data(config)
  config = _resolve_num_classes(config, builder)
  return config, builder, eval_sets, sharding.create_mesh()


def _load_replicated_variables(source: str, reference: dict, mesh,
                               ema: bool) -> dict:
  """A checkpoint's params and batch_stats (``ema``: their EMA), checked
  against ``reference``'s shapes and replicated over the mesh."""
  variables = checkpoints.load_variables(source, ema)
  checkpoints.check_compatible(variables, reference, source)
  return jax.device_put(variables, sharding.replicated(mesh))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_at_step: int | None = None) -> dict[str, float]:
  """Trains for ``config.num_epochs``, resuming from the workdir if possible.

  Args:
    config: the run's config.
    workdir: checkpoints and TensorBoard events go here.
    stop_at_step: if set, checkpoint and return at this step (the schedule
      still spans ``config.num_epochs``); a later call resumes from it.

  Returns:
    The last evaluation metrics of this call (possibly empty if stopped
    early).
  """
  config, builder, eval_sets, mesh = _setup(config, workdir)
  local_batch = config.batch_size // jax.process_count()
  steps_per_epoch = input_pipeline.train_steps_per_epoch(
      builder, config, local_batch, jax.process_count())
  total_steps = config.num_epochs * steps_per_epoch
  run = build.training(config, mesh, steps_per_epoch)
  state = run.state

  manager = checkpoints.CheckpointManager(
      checkpoints.workdir_checkpoints(workdir), config.max_checkpoints_to_keep)
  # Each checkpoint carries its config and the dataset's class names.
  class_names = registry.class_names(builder)
  save = functools.partial(manager.save, config=config,
                           class_names=class_names)
  best = checkpoints.BestCheckpoint(checkpoints.workdir_best(workdir))
  restored = manager.restore_latest_good(state)
  if restored is not None:
    state = restored
    logging.info('Resumed from step %d in %s.', int(state.step),
                 manager.directory)
  elif config.init_from:
    state = state.with_variables(jax.device_put(
        pretrained.initialise(config, state.variables()),
        sharding.replicated(mesh)))
  start_step = int(state.step)

  writer = _create_writer(workdir)
  if start_step == 0:
    writer.write_hparams(config_lib.flat_config(config.to_dict()))
  train_step, eval_step = run.train_step, run.eval_step
  batches = sharding.device_prefetch(input_pipeline.create_train_iterator(
      builder, config, local_batch, start_step, jax.process_index(),
      jax.process_count()), mesh)

  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps,
                                           writer=writer)]
  if config.profile_steps and jax.process_index() == 0:
    # One profile, of the profile_steps steps after the first (compiling)
    # one.
    hooks.append(periodic_actions.Profile(
        logdir=workdir, num_profile_steps=config.profile_steps,
        profile_duration_ms=None, first_profile=start_step + 1,
        every_secs=None))

  logging.info('Training %d steps (%d per epoch) from step %d on %d devices.',
               total_steps, steps_per_epoch, start_step, jax.device_count())
  eval_metrics = {}
  pending = []
  interval_start = time.perf_counter()
  end_step = total_steps if stop_at_step is None else max(
      start_step, min(stop_at_step, total_steps))
  nonfinite_run = 0
  with preemption.StopRequests() as stop:
    for step in range(start_step, end_step):
      state, metrics = train_step(state, next(batches))
      pending.append(metrics)
      done = step + 1
      if step == start_step:
        jax.block_until_ready(metrics)
        logging.info('First step done %.1f s after the process started.',
                     runtime.seconds_since_process_start())
      for hook in hooks:
        hook(done)
      if done % config.log_every_steps == 0 or done == end_step:
        history = jax.device_get(pending)
        nonfinite_run = precision.count_nonfinite_run(
            [m['finite'] for m in history], nonfinite_run, done, config)
        _write_train(writer, done, history, config,
                     time.perf_counter() - interval_start)
        pending, interval_start = [], time.perf_counter()
      if done % steps_per_epoch == 0:
        epoch = done // steps_per_epoch
        last = done == total_steps
        if last or epoch % config.eval_every_epochs == 0:
          eval_metrics = _evaluate_live_and_ema(
              state, eval_step, mesh, eval_sets, config, writer, done)
          _keep_if_best(best, manager, done, state, config, class_names,
                        eval_metrics)
        if last or epoch % config.checkpoint_every_epochs == 0:
          save(done, state)
      if stop.requested(done) and done < total_steps:
        best.close()
        _save_and_close(manager, save, done, state)
        writer.flush()
        raise preemption.Preempted(done, stop.signum)
  if end_step == total_steps and not eval_metrics:
    # Resumed from the final checkpoint: nothing trained, evaluate it.
    eval_metrics = _evaluate_live_and_ema(state, eval_step, mesh, eval_sets,
                                          config, writer, end_step)
    _keep_if_best(best, manager, end_step, state, config, class_names,
                  eval_metrics)
  best.close()
  if best.step is not None:
    logging.info('Best checkpoint: step %d, eval/top1 %.4f, in %s.',
                 best.step, best.top1, best.directory)
  _save_and_close(manager, save, end_step, state)
  writer.flush()
  if end_step < total_steps:
    logging.info('Stopped at step %d of %d; rerun to resume.', end_step,
                 total_steps)
  return eval_metrics


def _keep_if_best(best: checkpoints.BestCheckpoint,
                  manager: checkpoints.CheckpointManager, step: int, state,
                  config, class_names, metrics: dict[str, float]) -> None:
  """Saves ``state`` as the best checkpoint if its eval/top1 is the highest
  yet, and logs which step is the best.

  The save runs alone: orbax synchronises a multi-process save through
  barriers whose names collide when two managers save at once (a
  two-process run failed with "Barrier ... is already ongoing").
  """
  previous = best.step
  manager.wait()
  if best.update(step, state, config, class_names, metrics):
    best.wait()
    logging.info('New best eval/top1 %.4f at step %d, kept in %s.',
                 best.top1, step, best.directory)
  else:
    logging.info('The best eval/top1 is still %.4f, at step %d (step %d: '
                 '%.4f).', best.top1, previous, step, metrics['top1'])


def _save_and_close(manager, save, step: int, state) -> None:
  """Checkpoints ``step`` with ``save`` unless already saved, and waits for
  the write."""
  if manager.latest_step() != step:
    save(step, state)
  manager.wait()
  manager.close()
  logging.info('Checkpoint for step %d is complete in %s.', step,
               manager.directory)


def _write_train(writer, step: int, history: list, config,
                 elapsed: float) -> None:
  """Averages the steps since the last write and writes them."""
  means = {k: float(np.mean([m[k] for m in history])) for k in history[0]}
  scalars = {
      'train/loss': means['loss'],
      'train/top1': means['top1'],
      'train/learning_rate': means['learning_rate'],
      'train/images_per_sec': len(history) * config.batch_size / elapsed,
      'train/nonfinite_steps': len(history) * (1.0 - means['finite']),
  }
  if 'loss_scale' in means:
    scalars['train/loss_scale'] = float(history[-1]['loss_scale'])
  writer.write_scalars(step, scalars)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        checkpoint: str | None = None,
                        ema: bool = False) -> dict[str, float]:
  """Evaluates a checkpoint; trains nothing.

  Args:
    config: the run's config.
    workdir: eval metrics go here.
    checkpoint: a workdir, checkpoint directory or step folder; ``'best'``:
      the workdir's best checkpoint; None: the workdir's latest.
    ema: evaluate the checkpoint's EMA variables (written as ``eval_ema/*``)
      instead of its live ones.
  """
  config, _, eval_sets, mesh = _setup(config, workdir)
  if checkpoint == BEST:
    source = str(checkpoints.workdir_best(workdir))
  else:
    source = checkpoint or str(checkpoints.workdir_checkpoints(workdir))
  run = build.training(config, mesh, steps_per_epoch=1, abstract=True)
  variables = _load_replicated_variables(source, run.state.variables(), mesh,
                                         ema)
  state = steps.TrainState.create(
      apply_fn=run.model.apply, params=variables['params'],
      batch_stats=variables['batch_stats'], tx=optax.identity())
  step = checkpoints.checkpoint_step(source)
  logging.info('Evaluating the %s variables of step %d of %s.',
               'EMA' if ema else 'live', step, source)
  writer = _create_writer(workdir)
  metrics = _evaluate_all(state, run.eval_step, mesh, eval_sets, config,
                          writer, step, EMA_SUFFIX if ema else '')
  writer.flush()
  return metrics
