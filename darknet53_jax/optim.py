"""Learning-rate schedule, optimiser and loss."""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from darknet53_jax import model as model_lib

LR_SCALING_RULES = ('linear', 'none')
# How the cosine after warm-up counts: ours, per step from the end of
# warm-up, or the MindSpore reference's, per epoch from epoch 0.
COSINE_SCHEDULES = ('per_step_after_warmup', 'per_epoch_from_epoch0')


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """The base rate, scaled by global batch / 256 under the 'linear' rule
  (``config.lr_scaling`` is one of LR_SCALING_RULES: ``config_lib``)."""
  if config.lr_scaling == 'linear':
    return config.learning_rate * config.batch_size / 256
  return config.learning_rate


def create_learning_rate_schedule(config: ml_collections.ConfigDict,
                                  steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up, then cosine decay to ``config.eta_min``.

  Warm-up follows the reference: step i < warmup_steps gets
  peak * (i + 1) / warmup_steps, so the first step already learns. Then
  eta_min + (peak - eta_min) * (1 + cos(pi * progress)) / 2, where
  ``config.cosine_schedule`` (one of COSINE_SCHEDULES) sets progress:

  - 'per_step_after_warmup': (i - warmup_steps) / (total_steps -
    warmup_steps), so the cosine starts at the peak when warm-up ends;
  - 'per_epoch_from_epoch0': (i // steps_per_epoch) / num_epochs, the
    reference's ``warmup_cosine_annealing_lr`` with T_max = num_epochs: it
    is constant within an epoch, and the first epoch after warm-up is
    already warmup_epochs / num_epochs of the way down.
  """
  peak = peak_learning_rate(config)
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  total_steps = int(config.num_epochs * steps_per_epoch)
  decay_steps = max(1, total_steps - warmup_steps)

  def cosine_progress(step):
    if config.cosine_schedule == 'per_epoch_from_epoch0':
      epoch = jnp.asarray(jnp.asarray(step) // steps_per_epoch, float)
      return jnp.minimum(epoch / config.num_epochs, 1.0)
    return jnp.clip((jnp.asarray(step, float) - warmup_steps) /
                    decay_steps, 0.0, 1.0)

  def schedule(step):
    progress = cosine_progress(step)
    step = jnp.asarray(step, float)
    warmup = peak * (step + 1) / max(1, warmup_steps)
    cosine = config.eta_min + (peak - config.eta_min) * 0.5 * (
        1 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup_steps, warmup, cosine)

  return schedule


def weight_decay_mask(params):
  """True for conv and dense kernels; BatchNorm scales and biases are exempt."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def parameter_groups(params):
  """``params``' top-level modules labelled 'head' (the classifier) or
  'backbone' (every other module)."""
  return {name: 'head' if name == model_lib.HEAD else 'backbone'
          for name in params}


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum and decoupled-from-BN weight decay (as the reference).

  The decay is added to the gradient before momentum, like the reference's
  ``Momentum(weight_decay=...)`` and PyTorch's SGD. For fine-tuning, the
  backbone's updates are scaled by ``config.backbone_lr_multiplier`` (as a
  PyTorch parameter group with that fraction of the learning rate), or with
  ``config.freeze_backbone`` are zero: no step, decay or momentum moves the
  backbone, and it has no optimiser state.
  """
  sgd = optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
      optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
  if config.freeze_backbone:
    backbone = optax.set_to_zero()
  elif config.backbone_lr_multiplier != 1.0:
    backbone = optax.chain(sgd, optax.scale(config.backbone_lr_multiplier))
  else:
    return sgd
  return optax.multi_transform({'head': sgd, 'backbone': backbone},
                               parameter_groups)


def smoothed_one_hot(labels, num_classes: int, smoothing: float):
  """One-hot targets with 1 - e on the label and e / (K - 1) elsewhere.

  This is the reference's ``CrossEntropySmooth``; ``optax.smooth_labels``
  instead puts e / K everywhere, which differs slightly.
  """
  one_hot = jax.nn.one_hot(labels, num_classes)
  off = smoothing / max(1, num_classes - 1)
  return one_hot * (1.0 - smoothing) + (1.0 - one_hot) * off


def cross_entropy(logits, labels, smoothing: float = 0.0):
  """Per-example softmax cross-entropy against label-smoothed targets."""
  targets = smoothed_one_hot(labels, logits.shape[-1], smoothing)
  return optax.softmax_cross_entropy(logits, targets)
