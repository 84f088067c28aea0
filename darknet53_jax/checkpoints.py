"""Orbax checkpoints: the train state plus the config that made it.

A checkpoint directory (a workdir's ``checkpoints/``) holds one folder per
step. Each step stores ``state`` (the TrainState arrays), ``config`` (JSON)
and, when the run knew them, ``class_names`` (JSON: the dataset and its label
names), so predict and export can rebuild the model, its eval protocol and
its labels from the checkpoint alone. Orbax commits a step atomically: an
interrupted save leaves no step that restores.

A workdir's ``best/`` holds one more checkpoint directory: the params,
BatchNorm statistics and (if any) their EMA of the evaluation with the highest ``eval/top1`` so far
(``BestCheckpoint``), with those metrics (``eval_metrics``, JSON).
"""

import os
from typing import Any, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from darknet53_jax import errors

STATE = 'state'
CONFIG = 'config'
CLASS_NAMES = 'class_names'
EVAL_METRICS = 'eval_metrics'  # Not 'metrics': orbax's own item.
WORKDIR_SUBDIR = 'checkpoints'
BEST_SUBDIR = 'best'
MODEL_COLLECTIONS = ('params', 'batch_stats')
EMA = 'ema'  # The train state's moving average of MODEL_COLLECTIONS.


class CheckpointError(errors.UserError, ValueError):
  """A checkpoint that is missing or does not fit the model."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint whose files cannot be read back."""


class CheckpointManager:
  """Saves and restores train states under one directory."""

  def __init__(self, directory: str, max_to_keep: int | None = None):
    self.directory = epath.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True),
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       CONFIG: ocp.JsonCheckpointHandler(),
                       CLASS_NAMES: ocp.JsonCheckpointHandler(),
                       EVAL_METRICS: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict,
           class_names: Sequence[str] | None = None,
           metrics: dict[str, float] | None = None) -> None:
    """Starts an asynchronous save; ``wait`` or ``close`` finishes it.

    Args:
      step: the training step.
      state: the train state (or any pytree holding ``MODEL_COLLECTIONS``).
      config: the run's config, saved as JSON.
      class_names: the label names of ``config.dataset`` by class index, if
        known; saved with the dataset name for predict and export.
      metrics: eval metrics of this state, if any, saved as JSON.
    """
    items = {STATE: ocp.args.StandardSave(state),
             CONFIG: ocp.args.JsonSave(config.to_dict())}
    if class_names is not None:
      if len(class_names) != config.num_classes:
        raise ValueError(f'{len(class_names)} class names for '
                         f'config.num_classes={config.num_classes}.')
      items[CLASS_NAMES] = ocp.args.JsonSave(
          {'dataset': config.dataset, 'names': list(class_names)})
    if metrics is not None:
      items[EVAL_METRICS] = ocp.args.JsonSave(metrics)
    self._manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, template: Any, step: int | None = None) -> Any:
    """Restores the state at ``step`` (default: latest) into ``template``'s
    structure, shapes and shardings.

    Raises:
      CheckpointError: there is no checkpoint, or its model does not fit the
        template's.
      DamagedCheckpointError: the checkpoint's files cannot be read back.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'No checkpoint in {self.directory}.')
    source = f'Checkpoint {self.directory}/{step}'
    try:
      saved = self._manager.item_metadata(step)[STATE].tree
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(
          f'{source}: {errors.first_line(e)}') from None
    check_compatible(
        {k: saved[k] for k in MODEL_COLLECTIONS},
        {k: getattr(template, k) for k in MODEL_COLLECTIONS}, source)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract)}))
    except Exception as e:  # pylint: disable=broad-except
      # Damage or a changed optimiser/precision surfaces as whatever the
      # storage layer raises.
      raise DamagedCheckpointError(
          f'{source}: {errors.first_line(e)}') from None
    return restored[STATE]

  def restore_latest_good(self, template: Any) -> Any | None:
    """Restores the newest step that reads back whole; None if there is none.

    A step that cannot be read (files removed or truncated) is logged and
    skipped in favour of the one before it. If steps exist but none reads,
    this raises rather than let a fresh run overwrite them.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    reasons = []
    for step in steps:
      try:
        return self.restore(template, step)
      except DamagedCheckpointError as e:
        logging.warning('Skipping unreadable checkpoint: %s', e)
        reasons.append(str(e))
    if steps:
      raise CheckpointError(
          f'No checkpoint in {self.directory} can be restored into this run '
          f'(was config.dtype, the optimiser or config.ema_decay changed?); move them away to '
          f'start afresh. Newest: {reasons[0]}')
    return None

  def delete(self, step: int) -> None:
    self._manager.delete(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


class BestCheckpoint:
  """Keeps the variables of the evaluation with the highest top-1.

  One checkpoint directory holds one step: the params, batch_stats and EMA
  (if any) of the best evaluation so far, its config, class names and eval metrics. It
  picks up where a resumed run left it. A tie keeps the earlier step.
  """

  def __init__(self, directory: str):
    self._manager = CheckpointManager(directory, max_to_keep=1)
    self.directory = self._manager.directory
    self.step = self._manager.latest_step()
    self.top1 = (None if self.step is None else
                 load_metrics(os.fspath(self.directory))['top1'])

  def update(self, step: int, state: Any, config: ml_collections.ConfigDict,
             class_names: Sequence[str] | None,
             metrics: dict[str, float]) -> bool:
    """Saves ``state``'s variables if ``metrics['top1']`` beats the best.

    Returns:
      Whether ``step`` is the new best.
    """
    if self.top1 is not None and metrics['top1'] <= self.top1:
      return False
    if self.step is not None and self.step >= step:
      # A resumed run replaying the steps up to the best it had reached.
      self._manager.delete(self.step)
    variables = {k: getattr(state, k) for k in MODEL_COLLECTIONS}
    if getattr(state, EMA, None) is not None:
      variables[EMA] = state.ema
    self._manager.save(step, variables, config, class_names, metrics)
    self.step, self.top1 = step, metrics['top1']
    return True

  def wait(self) -> None:
    """Waits for the last save."""
    self._manager.wait()

  def close(self) -> None:
    """Waits for the last save and releases the directory."""
    self.wait()
    self._manager.close()


def workdir_checkpoints(workdir: str) -> epath.Path:
  """The checkpoint directory of a training workdir."""
  return epath.Path(workdir) / WORKDIR_SUBDIR


def workdir_best(workdir: str) -> epath.Path:
  """The best-checkpoint directory of a training workdir."""
  return epath.Path(workdir) / BEST_SUBDIR


def _step_directory(path: str) -> epath.Path:
  """A step folder, given itself or a checkpoint directory (latest step)."""
  path = epath.Path(path).absolute()
  if (path / STATE).exists():
    return path
  if path.exists():
    steps = [int(p.name) for p in path.iterdir()
             if p.name.isdigit() and (p / STATE).exists()]
    if steps:
      return path / str(max(steps))
    if (path / WORKDIR_SUBDIR).exists():
      return _step_directory(os.fspath(path / WORKDIR_SUBDIR))
  raise CheckpointError(
      f'No checkpoint at {path}: give a workdir, its checkpoints/ folder or '
      'one step folder inside it.')


def load_variables(path: str, ema: bool = False) -> dict:
  """``{'params', 'batch_stats'}`` from a checkpoint, as host arrays.

  Accepts a workdir, a checkpoint directory (its latest step) or a step
  folder. Only arrays are read: nothing in the file is executed.

  Args:
    path: the checkpoint.
    ema: the EMA's variables instead of the live ones.

  Raises:
    CheckpointError: no checkpoint there, or ``ema`` and it holds no EMA.
  """
  step_dir = _step_directory(path)
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(step_dir / STATE).item_metadata.tree
    # NumPy arrays, not the saved shardings: a checkpoint written on any
    # number of devices and processes loads on this one.
    to_host = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    state = checkpointer.restore(
        step_dir / STATE, args=ocp.args.PyTreeRestore(restore_args=to_host))
  if ema:
    if not state.get(EMA):
      raise CheckpointError(
          f'{step_dir} holds no EMA variables (its run had '
          'config.ema_decay=0): drop --ema to use its live ones.')
    state = state[EMA]
  return {k: state[k] for k in MODEL_COLLECTIONS}


def checkpoint_step(path: str) -> int:
  """The training step a checkpoint was written at."""
  return int(_step_directory(path).name)


def load_config(path: str) -> ml_collections.ConfigDict:
  """The config saved beside a checkpoint."""
  step_dir = _step_directory(path)
  return ml_collections.ConfigDict(
      ocp.JsonCheckpointHandler().restore(step_dir / CONFIG))


def load_metrics(path: str) -> dict[str, float] | None:
  """The eval metrics saved beside a checkpoint (best checkpoints have
  them), or None."""
  item = _step_directory(path) / EVAL_METRICS
  if not item.exists():
    return None
  return dict(ocp.JsonCheckpointHandler().restore(item))


def load_class_names(path: str) -> list[str] | None:
  """The label names saved beside a checkpoint, by class index.

  Returns:
    The names, or None for a checkpoint saved without them (older ones, and
    runs whose dataset has no label names).

  Raises:
    CheckpointError: the names do not match the saved config's classes.
  """
  item = _step_directory(path) / CLASS_NAMES
  if not item.exists():
    return None
  names = list(ocp.JsonCheckpointHandler().restore(item)['names'])
  num_classes = load_config(path).num_classes
  if len(names) != num_classes:
    raise CheckpointError(
        f'{item} holds {len(names)} class names for a {num_classes}-class '
        'model: remove that folder to label the classes by index.')
  return names


def check_compatible(
    variables: dict, reference: dict, source: str,
    advice: str = 'Set config.model and config.num_classes as in the run '
    'that wrote it.') -> None:
  """Raises CheckpointError, ending in ``advice``, unless the two variable
  trees have equal shapes."""
  got, want = _shapes(variables), _shapes(reference)
  for key in sorted(set(got) | set(want), key=str):
    if got.get(key) != want.get(key):
      raise CheckpointError(
          f'{source} does not fit this model: '
          f'{jax.tree_util.keystr(key)} has shape {got.get(key)} there and '
          f'{want.get(key)} here. {advice}')


def _shapes(tree) -> dict:
  """Each leaf's shape, keyed by its path."""
  return {path: tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
