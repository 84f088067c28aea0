"""Assembles a training run from a config and a mesh: the model, the
learning-rate schedule, the optimiser, the replicated train state and the
compiled-on-first-call steps.

The training loop, the tests and the benchmarks all build their runs here, so
what they measure is what ``main`` trains.
"""

import concurrent.futures
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from darknet53_jax import config_defaults
from darknet53_jax import model as model_lib
from darknet53_jax import optim
from darknet53_jax import precision
from darknet53_jax import sharding
from darknet53_jax import steps

# The smallest input the model takes: its parameters do not depend on the
# image size, so initialising at it keeps init's forward pass cheap.
INIT_SIZE = 32
# XLA:CPU options for programs that run once: seconds less to compile.
_QUICK_CPU_COMPILE = {'xla_backend_optimization_level': 0,
                      'xla_cpu_use_fusion_emitters': False,
                      'xla_llvm_disable_expensive_passes': True}


# Initialisation programs compiling in the background, by (model, mesh)
# (``start_compiling_init``); ``_Programs`` takes them over.
_BACKGROUND = concurrent.futures.ThreadPoolExecutor(
    max_workers=1, thread_name_prefix='compile_init')
_STARTED_INITS: dict[tuple, concurrent.futures.Future] = {}


def create_model(config: ml_collections.ConfigDict) -> model_lib.Darknet53:
  """The Darknet-53 that ``config.model`` describes, with
  ``config.num_classes`` outputs.

  Fields ``config.model`` lacks take their defaults: a checkpoint's config
  from before a field existed still builds its model.
  """
  m = ml_collections.ConfigDict({
      **config_defaults.get_config().model.to_dict(),
      **config.model.to_dict()})
  return model_lib.Darknet53(
      num_classes=config.num_classes, activation=m.activation,
      negative_slope=m.negative_slope, width_multiplier=m.width_multiplier,
      stage_depths=tuple(m.stage_depths),
      dtype=precision.compute_dtype(config), kernel_init=m.kernel_init,
      head_init=m.head_init, bn_momentum=m.bn_momentum,
      bn_epsilon=m.bn_epsilon, bn_unbiased_variance=m.bn_unbiased_variance,
      bn_axis_name=sharding.DATA_AXIS if config.sync_batch_norm else None,
      cpu_matmul_convs=m.cpu_matmul_convs)


def _initialising_copy(model: model_lib.Darknet53) -> model_lib.Darknet53:
  """The copy of ``model`` that computes its initial variables: float32, XLA's
  convolutions, per-device BatchNorm. The variables depend on the
  architecture and initialisers alone, so runs that differ only in dtype,
  BatchNorm axis or convolutions (or in the optimiser) share its program."""
  return model.clone(dtype=jnp.float32, bn_axis_name=None,
                     cpu_matmul_convs=False)


def init_variables(rng: jax.Array, model: model_lib.Darknet53) -> dict:
  """The model's initial ``{'params', 'batch_stats'}``."""
  return _initialising_copy(model).init(
      rng, jnp.zeros((1, INIT_SIZE, INIT_SIZE, 3), jnp.float32), train=False)


def create_train_state(variables: dict, config: ml_collections.ConfigDict,
                       model: model_lib.Darknet53,
                       tx: optax.GradientTransformation) -> steps.TrainState:
  """The train state of initial ``variables``: the optimiser's, (for
  float16) the loss scale and (with ``config.ema_decay``) the EMA, a copy of
  the variables."""
  state = steps.TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      batch_stats=variables['batch_stats'], tx=tx,
      dynamic_scale=precision.create_loss_scale(config),
      ema_decay=config.ema_decay, ema_warmup=config.ema_warmup)
  # A strongly typed step, as a checkpoint restores it: a resumed run then
  # traces, and finds in the compilation cache, a fresh run's train step.
  state = state.replace(step=jnp.zeros((), jnp.int32))
  if config.ema_decay:
    state = state.replace(ema=jax.tree.map(jnp.copy, dict(variables)))
  return state


def _compile_options(mesh: Mesh) -> dict | None:
  """For programs that run once: on CPUs, XLA's lowest optimisation level
  compiles them several times faster and moves the random values by at
  most one float32 ulp, and without the fusion emitters and LLVM's
  expensive passes faster still, to the same values (docs/performance.md)."""
  return _QUICK_CPU_COMPILE if mesh.devices.flat[0].platform == 'cpu' else None


@functools.lru_cache(maxsize=8)
def _compile_init_variables(model: model_lib.Darknet53, mesh: Mesh):
  """``init_variables`` of ``model`` (an ``_initialising_copy``: the key of
  this per-process cache), compiled to arrays replicated over ``mesh``:
  (a key on the default device) -> variables."""
  rng = jax.random.key(0)  # Its shape, dtype and placement; not its value.
  return jax.jit(functools.partial(init_variables, model=model),
                 out_shardings=sharding.replicated(mesh)).lower(rng).compile(
                     _compile_options(mesh))


def start_compiling_init(config: ml_collections.ConfigDict,
                         mesh: Mesh) -> None:
  """Begins compiling the initialisation of ``config``'s model on ``mesh``
  in a background thread, for ``training`` to take over: ``main`` imports
  TensorFlow meanwhile (XLA compiles without Python's lock).

  The compile does not see the caller's thread-local JAX settings
  (``jax.enable_x64`` and other contexts): call it outside them.
  """
  model = _initialising_copy(create_model(config))
  _STARTED_INITS[(model, mesh)] = _BACKGROUND.submit(
      _compile_init_variables, model, mesh)


@dataclasses.dataclass(frozen=True)
class Training:
  """What a training run needs besides its data.

  Attributes:
    model: the Darknet-53.
    schedule: the learning rate at each step.
    state: the initial train state, replicated over the mesh; with
      ``abstract=True`` its shapes, dtypes and shardings only.
    train_step: ``steps.make_train_step``'s step (it donates its state).
    eval_step: ``steps.make_eval_step``'s step.
  """
  model: model_lib.Darknet53
  schedule: optax.Schedule
  state: steps.TrainState
  train_step: Callable
  eval_step: Callable


class _Programs:
  """The parts of a run that depend only on its config, mesh and epoch
  length: built once per process (``training`` keeps them), then reused."""

  def __init__(self, config: ml_collections.FrozenConfigDict, mesh: Mesh,
               steps_per_epoch: int):
    config = ml_collections.ConfigDict(config)
    self.model = create_model(config)
    self.schedule = optim.create_learning_rate_schedule(config,
                                                        steps_per_epoch)
    self.train_step = steps.make_train_step(mesh, config, self.schedule)
    self.eval_step = steps.make_eval_step(mesh, config)
    self._create_state = functools.partial(
        create_train_state, config=config, model=self.model,
        tx=optim.create_optimizer(config, self.schedule))
    self._mesh = mesh
    self._rng = jax.random.key(config.seed)

  @functools.cached_property
  def _compiled_init(self):
    """The initial variables, then the state around them, each compiled to
    arrays replicated over the mesh (two programs: the first, all of init's
    compile time, is shared by the runs of one architecture in a
    process)."""
    model = _initialising_copy(self.model)
    started = _STARTED_INITS.pop((model, self._mesh), None)
    variables = (started.result() if started else
                 _compile_init_variables(model, self._mesh))
    create_state = jax.jit(self._create_state,
                           out_shardings=sharding.replicated(self._mesh),
                           donate_argnums=0)
    state = create_state.lower(variables.out_info).compile(
        _compile_options(self._mesh))
    return lambda rng: state(variables(rng))

  def initial_state(self) -> steps.TrainState:
    """A fresh initial state (the train step donates its input)."""
    return self._compiled_init(self._rng)

  @functools.cached_property
  def abstract_state(self) -> steps.TrainState:
    """The initial state's shapes, dtypes and shardings."""
    replicated = sharding.replicated(self._mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(lambda rng: self._create_state(
            init_variables(rng, self.model)), self._rng))


# A few configs' worth: a notebook or a test session that reruns a config
# skips tracing, lowering and loading its programs again.
@functools.lru_cache(maxsize=8)
def _programs(config: ml_collections.FrozenConfigDict, mesh: Mesh,
              steps_per_epoch: int) -> _Programs:
  return _Programs(config, mesh, steps_per_epoch)


def training(config: ml_collections.ConfigDict, mesh: Mesh,
             steps_per_epoch: int, *, abstract: bool = False) -> Training:
  """Builds the run that ``config`` describes on ``mesh``.

  A later call with an equal config, mesh and ``steps_per_epoch`` in the
  same process reuses the first call's jitted steps and compiled
  initialisation; only the initial state is computed afresh.

  Args:
    config: a validated config with ``num_classes`` resolved.
    mesh: the ``data`` mesh (``sharding.create_mesh``).
    steps_per_epoch: train steps per epoch, for the schedule.
    abstract: describe the initial state without computing it (to lower
      the steps, or as the template of a checkpoint).
  """
  programs = _programs(ml_collections.FrozenConfigDict(config), mesh,
                       steps_per_epoch)
  state = programs.abstract_state if abstract else programs.initial_state()
  return Training(model=programs.model, schedule=programs.schedule,
                  state=state, train_step=programs.train_step,
                  eval_step=programs.eval_step)
