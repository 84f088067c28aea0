"""Precision: compute dtypes, the float16 loss scale, and what happens to a
step whose loss or gradients are not finite.

Parameters, optimiser state and BatchNorm statistics are float32 in every
mode; ``dtype`` is the precision of the convolutions and activations.
float16 scales the loss dynamically (``flax.training.dynamic_scale``); in
every mode a non-finite step changes no parameter, statistic or optimiser
state. float16 expects such steps (the loss scale backs off); for float32 and
bfloat16 a long run of them means the training diverged, and it stops.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax.training import dynamic_scale as dynamic_scale_lib
from jax import lax

from darknet53_jax import errors

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}


class DivergedError(errors.UserError, RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


def compute_dtype(config: ml_collections.ConfigDict):
  """The jnp dtype of ``config.dtype`` (validated by ``config_lib``)."""
  return DTYPES[config.dtype]


def create_loss_scale(
    config: ml_collections.ConfigDict) -> dynamic_scale_lib.DynamicScale | None:
  """float16's dynamic loss scale (None for float32 and bfloat16)."""
  if config.dtype != 'float16':
    return None
  return dynamic_scale_lib.DynamicScale(
      growth_factor=2.0, backoff_factor=0.5,
      growth_interval=config.loss_scale_growth_interval,
      scale=jnp.asarray(config.loss_scale, jnp.float32))


def all_finite(loss: jax.Array, grads: Any) -> jax.Array:
  """Whether the loss and every gradient are finite (a boolean scalar)."""
  finite = jnp.isfinite(loss)
  for g in jax.tree.leaves(grads):
    finite &= jnp.all(jnp.isfinite(g))
  return finite


def apply_if_finite(state, finite: jax.Array, grads: Any,
                    batch_stats: Any):
  """``state.apply_gradients`` if ``finite``, else only ``step + 1``.

  One branch over the whole update, not a select per leaf: with selects
  XLA:CPU compiles the train step about three times slower
  (docs/performance.md).
  """
  return lax.cond(
      finite,
      lambda: state.apply_gradients(grads=grads, batch_stats=batch_stats),
      lambda: state.replace(step=state.step + 1))


def count_nonfinite_run(finite_flags, run: int, step: int,
                        config: ml_collections.ConfigDict) -> int:
  """The count of consecutive non-finite steps after ``finite_flags``.

  Args:
    finite_flags: the ``finite`` metric of each step since the last call.
    run: the count before them.
    step: the last step, for the message.
    config: ``dtype`` and ``max_consecutive_nonfinite_steps``.

  Raises:
    DivergedError: for float32 and bfloat16, when the count reaches
      ``config.max_consecutive_nonfinite_steps``.
  """
  for finite in finite_flags:
    run = 0 if finite else run + 1
  if config.dtype != 'float16' and run >= config.max_consecutive_nonfinite_steps:
    raise DivergedError(
        f'{run} consecutive steps up to step {step} had a non-finite loss or '
        'gradient (the checkpoints hold the last good state): lower '
        'config.learning_rate or use another config.dtype.')
  return run
