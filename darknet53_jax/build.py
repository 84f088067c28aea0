"""Assembles a training run from a config and a mesh: the model, the
learning-rate schedule, the optimiser, the replicated train state and the
compiled-on-first-call steps.

The training loop, the tests and the benchmarks all build their runs here, so
what they measure is what ``main`` trains.
"""

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


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict,
                       model: model_lib.Darknet53,
                       tx: optax.GradientTransformation) -> steps.TrainState:
  """Initialises the variables, optimiser, (for float16) the loss scale and
  (with ``config.ema_decay``) the EMA, a copy of the variables."""
  variables = model.init(
      rng, jnp.zeros((1, INIT_SIZE, INIT_SIZE, 3), jnp.float32), train=False)
  state = steps.TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      batch_stats=variables['batch_stats'], tx=tx,
      dynamic_scale=precision.create_loss_scale(config),
      ema_decay=config.ema_decay, ema_warmup=config.ema_warmup)
  if config.ema_decay:
    state = state.replace(ema=jax.tree.map(jnp.copy, dict(variables)))
  return state


def _replicated_train_state(init: Callable, mesh: Mesh,
                            rng: jax.Array) -> steps.TrainState:
  """``init(rng)``, jitted and replicated over the mesh."""
  # It runs once: on CPUs, XLA's lowest optimisation level compiles it
  # several times faster and moves its random values by at most one float32
  # ulp (docs/performance.md).
  on_cpu = mesh.devices.flat[0].platform == 'cpu'
  options = {'xla_backend_optimization_level': 0} if on_cpu else None
  return jax.jit(init, out_shardings=sharding.replicated(mesh)).lower(
      rng).compile(options)(rng)


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


def training(config: ml_collections.ConfigDict, mesh: Mesh,
             steps_per_epoch: int, *, abstract: bool = False) -> Training:
  """Builds the run that ``config`` describes on ``mesh``.

  Args:
    config: a validated config with ``num_classes`` resolved.
    mesh: the ``data`` mesh (``sharding.create_mesh``).
    steps_per_epoch: train steps per epoch, for the schedule.
    abstract: describe the initial state without computing it (to lower
      the steps, or as the template of a checkpoint).
  """
  model = create_model(config)
  schedule = optim.create_learning_rate_schedule(config, steps_per_epoch)
  init = functools.partial(create_train_state, config=config, model=model,
                           tx=optim.create_optimizer(config, schedule))
  rng = jax.random.key(config.seed)
  if abstract:
    replicated = sharding.replicated(mesh)
    state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(init, rng))
  else:
    state = _replicated_train_state(init, mesh, rng)
  return Training(model=model, schedule=schedule, state=state,
                  train_step=steps.make_train_step(mesh, config, schedule),
                  eval_step=steps.make_eval_step(mesh, config))
