"""An exponential moving average of the model's variables (``config.ema_decay``).

After each applied update, every parameter and BatchNorm statistic ``v``
moves its average ``a`` to ``decay * a + (1 - decay) * v``, in float32. The
average starts as the initial (or ``init_from``) variables. With
``config.ema_warmup`` the decay of the update that ends step ``n + 1`` is
``min(decay, (1 + n) / (10 + n))``, TensorFlow's ``ExponentialMovingAverage``
rule with ``num_updates``: early averages forget the random initialisation
fast.
"""

import jax
import jax.numpy as jnp


def decay_at(step, decay: float, warmup: bool):
  """The decay of the update applied at ``step`` (0 for the first one)."""
  if not warmup:
    return jnp.float32(decay)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1 + step) / (10 + step))


def update(average, variables, decay):
  """``decay * average + (1 - decay) * variables``, leaf by leaf."""
  return jax.tree.map(lambda a, v: decay * a + (1 - decay) * v,
                      average, variables)
