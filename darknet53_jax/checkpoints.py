"""Orbax checkpoints: the train state plus the config that made it.

A checkpoint directory (a workdir's ``checkpoints/``) holds one folder per
step. Each step stores ``state`` (the TrainState arrays) and ``config`` (JSON),
so predict and export can rebuild the model and its eval protocol from the
checkpoint alone. Orbax commits a step atomically: an interrupted save
leaves no step that restores.
"""

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

STATE = 'state'
CONFIG = 'config'


class CheckpointError(ValueError):
  """A checkpoint that is missing or does not fit the model."""


class CheckpointManager:
  """Saves and restores train states under one directory."""

  def __init__(self, directory: str, max_to_keep: int | None = None):
    self.directory = epath.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True),
        item_names=(STATE, CONFIG))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any,
           config: ml_collections.ConfigDict) -> None:
    """Starts an asynchronous save; ``wait`` or ``close`` finishes it."""
    self._manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        CONFIG: ocp.args.JsonSave(config.to_dict()),
    }))

  def restore(self, template: Any, step: int | None = None) -> Any:
    """Restores the state at ``step`` (default: latest) into ``template``'s
    structure, shapes and shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'No checkpoint in {self.directory}.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract)}))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f'Checkpoint {self.directory}/{step} does not fit this model and '
          f'config (different model shape, classes or optimiser?): '
          f'{_first_line(e)}') from None
    return restored[STATE]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _first_line(error: Exception) -> str:
  return str(error).strip().splitlines()[0] if str(error).strip() else repr(
      error)


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
    if (path / 'checkpoints').exists():
      return _step_directory(os.fspath(path / 'checkpoints'))
  raise CheckpointError(
      f'No checkpoint at {path}: give a workdir, its checkpoints/ folder or '
      'one step folder inside it.')


def load_variables(path: str) -> dict:
  """``{'params', 'batch_stats'}`` from a checkpoint, as host arrays.

  Accepts a workdir, a checkpoint directory (its latest step) or a step
  folder. Only arrays are read: nothing in the file is executed.
  """
  step_dir = _step_directory(path)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(step_dir / STATE)
  return {'params': state['params'], 'batch_stats': state['batch_stats']}


def checkpoint_step(path: str) -> int:
  """The training step a checkpoint was written at."""
  return int(_step_directory(path).name)


def load_config(path: str) -> ml_collections.ConfigDict:
  """The config saved beside a checkpoint."""
  step_dir = _step_directory(path)
  return ml_collections.ConfigDict(
      ocp.JsonCheckpointHandler().restore(step_dir / CONFIG))


def check_compatible(variables: dict, reference: dict, source: str) -> None:
  """Raises CheckpointError unless the two variable trees have equal shapes."""
  got = jax.tree_util.tree_flatten_with_path(
      jax.tree.map(lambda x: tuple(x.shape), variables))[0]
  want = dict(jax.tree_util.tree_flatten_with_path(
      jax.tree.map(lambda x: tuple(x.shape), reference))[0])
  got = dict(got)
  for key in sorted(set(got) | set(want), key=str):
    if got.get(key) != want.get(key):
      raise CheckpointError(
          f'{source} does not fit this model: '
          f'{jax.tree_util.keystr(key)} has shape {got.get(key)} there and '
          f'{want.get(key)} here. Set config.model and config.num_classes '
          'as in the run that wrote it.')
