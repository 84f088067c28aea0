"""Precision: compute dtypes, the float16 loss scale, and what happens to a
step whose loss or gradients are not finite.

Parameters, optimiser state and BatchNorm statistics are float32 in every
mode; ``dtype`` is the precision of the convolutions and activations.
float16 scales the loss, dynamically (``flax.training.dynamic_scale``) or by
a fixed factor (``config.loss_scale_mode``). By default a non-finite step
changes no parameter, statistic or optimiser state; float16 with a dynamic
scale expects such steps (the scale backs off), otherwise a long run of them
means the training diverged, and it stops. With
``config.skip_nonfinite_updates=False`` a non-finite step is applied as it
is, as the MindSpore reference's ``FixedLossScaleManager(
drop_overflow_update=False)`` does: its non-finite gradients reach the
parameters and the momentum.
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
LOSS_SCALE_MODES = ('dynamic', 'fixed')


class DivergedError(errors.UserError, RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


def compute_dtype(config: ml_collections.ConfigDict):
  """The jnp dtype of ``config.dtype`` (validated by ``config_lib``)."""
  return DTYPES[config.dtype]


def create_loss_scale(
    config: ml_collections.ConfigDict) -> dynamic_scale_lib.DynamicScale | None:
  """float16's loss scale (None for float32 and bfloat16).

  'dynamic' halves on a non-finite step and doubles after
  ``loss_scale_growth_interval`` finite ones; 'fixed' is the same state with
  both factors 1, so it keeps ``config.loss_scale`` and checkpoints alike.
  """
  if config.dtype != 'float16':
    return None
  factor = 2.0 if config.loss_scale_mode == 'dynamic' else 1.0
  return dynamic_scale_lib.DynamicScale(
      growth_factor=factor, backoff_factor=1 / factor,
      growth_interval=config.loss_scale_growth_interval,
      # Strongly typed, as a checkpoint restores them.
      fin_steps=jnp.zeros((), jnp.int32),
      scale=jnp.asarray(config.loss_scale, jnp.float32))


def update_loss_scale(
    dynamic_scale: dynamic_scale_lib.DynamicScale,
    finite: jax.Array) -> dynamic_scale_lib.DynamicScale:
  """The loss scale after a step that was ``finite`` or not, by the rule of
  ``DynamicScale.value_and_grad``, which applies it only to gradients it
  computes itself (not to accumulated ones): grow after ``growth_interval``
  finite steps, back off (not below ``minimum_scale``) on a non-finite one.
  """
  s = dynamic_scale
  grow = s.fin_steps == s.growth_interval
  grown = jnp.where(
      grow, jnp.minimum(s.scale * s.growth_factor, jnp.finfo(jnp.float32).max),
      s.scale)
  backed_off = s.scale * s.backoff_factor
  if s.minimum_scale is not None:
    backed_off = jnp.maximum(backed_off, s.minimum_scale)
  return s.replace(scale=jnp.where(finite, grown, backed_off),
                   fin_steps=jnp.where(grow | ~finite, 0, s.fin_steps + 1))


def all_finite(loss: jax.Array, grads: Any) -> jax.Array:
  """Whether the loss and every gradient are finite (a boolean scalar)."""
  finite = jnp.isfinite(loss)
  for g in jax.tree.leaves(grads):
    finite &= jnp.all(jnp.isfinite(g))
  return finite


def apply_if_finite(state, finite: jax.Array, grads: Any, batch_stats: Any,
                    skip_nonfinite: bool = True):
  """``state.apply_gradients`` if ``finite``, else only ``step + 1``; with
  ``skip_nonfinite=False``, ``state.apply_gradients`` whatever ``finite``.

  One branch over the whole update, not a select per leaf: with selects
  XLA:CPU compiles the train step much more slowly
  (docs/performance.md).
  """
  def apply():
    return state.apply_gradients(grads=grads, batch_stats=batch_stats)

  if not skip_nonfinite:
    return apply()
  return lax.cond(finite, apply, lambda: state.replace(step=state.step + 1))


def recovers_from_nonfinite(config: ml_collections.ConfigDict) -> bool:
  """Whether non-finite steps are expected and harmless: skipped, with a
  float16 loss scale that backs off."""
  return (config.dtype == 'float16' and config.loss_scale_mode == 'dynamic'
          and config.skip_nonfinite_updates)


def count_nonfinite_run(finite_flags, run: int, step: int,
                        config: ml_collections.ConfigDict) -> int:
  """The count of consecutive non-finite steps after ``finite_flags``.

  Args:
    finite_flags: the ``finite`` metric of each step since the last call.
    run: the count before them.
    step: the last step, for the message.
    config: the precision fields and ``max_consecutive_nonfinite_steps``.

  Raises:
    DivergedError: when the count reaches
      ``config.max_consecutive_nonfinite_steps``, unless
      ``recovers_from_nonfinite(config)``.
  """
  for finite in finite_flags:
    run = 0 if finite else run + 1
  if (not recovers_from_nonfinite(config) and
      run >= config.max_consecutive_nonfinite_steps):
    kept = ('the checkpoints hold the last good state'
            if config.skip_nonfinite_updates else
            'applied, as config.skip_nonfinite_updates=False asks: '
            'checkpoints since may hold non-finite values')
    raise DivergedError(
        f'{run} consecutive steps up to step {step} had a non-finite loss or '
        f'gradient ({kept}): lower config.learning_rate or change '
        'config.dtype or config.loss_scale_mode.')
  return run
