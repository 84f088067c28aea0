"""Learning-rate schedule, optimiser and loss."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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


def _progress_after_warmup(step, warmup_steps: int, total_steps: int):
  """0 at the end of warm-up, rising by one step's share to 1 at the end."""
  decay_steps = max(1, total_steps - warmup_steps)
  return jnp.clip((jnp.asarray(step, float) - warmup_steps) / decay_steps,
                  0.0, 1.0)


def _cosine_decay(config, peak, steps_per_epoch, warmup_steps, total_steps):
  """eta_min + (peak - eta_min) * (1 + cos(pi * progress)) / 2, where
  ``config.cosine_schedule`` (one of COSINE_SCHEDULES) sets progress:

  - 'per_step_after_warmup': (i - warmup_steps) / (total_steps -
    warmup_steps), so the cosine starts at the peak when warm-up ends;
  - 'per_epoch_from_epoch0': (i // steps_per_epoch) / num_epochs, the
    reference's ``warmup_cosine_annealing_lr`` with T_max = num_epochs: it
    is constant within an epoch, and the first epoch after warm-up is
    already warmup_epochs / num_epochs of the way down.
  """

  def cosine_progress(step):
    if config.cosine_schedule == 'per_epoch_from_epoch0':
      epoch = jnp.asarray(jnp.asarray(step) // steps_per_epoch, float)
      return jnp.minimum(epoch / config.num_epochs, 1.0)
    return _progress_after_warmup(step, warmup_steps, total_steps)

  def schedule(step):
    progress = cosine_progress(step)
    return config.eta_min + (peak - config.eta_min) * 0.5 * (
        1 + jnp.cos(jnp.pi * progress))

  return schedule


def _step_decay(config, peak, steps_per_epoch, warmup_steps, total_steps):
  """peak * lr_step_decay ** (boundaries passed): step i has passed the
  boundary at e epochs once i >= int(e * steps_per_epoch), so the boundary
  step itself runs at the lower rate (as Darknet's ``steps`` policy)."""
  del warmup_steps, total_steps  # The boundaries count from step 0.
  boundaries = np.array([int(epoch * steps_per_epoch)
                         for epoch in config.lr_step_epochs], np.int32)

  def schedule(step):
    passed = jnp.sum(jnp.asarray(step)[..., None] >= boundaries, axis=-1)
    return peak * config.lr_step_decay ** passed

  return schedule


def _poly_decay(config, peak, steps_per_epoch, warmup_steps, total_steps):
  """eta_min + (peak - eta_min) * (1 - progress) ** lr_poly_power, progress
  counted per step after warm-up as the 'per_step_after_warmup' cosine.

  Darknet's ``policy=poly`` (``get_current_rate`` in its src/network.c) is
  peak * (1 - i / max_batches) ** power, counted from step 0, after a
  burn-in of peak * (i / burn_in) ** power (the same power: 4 in
  darknet53.cfg). With warmup_epochs = 0 and eta_min = 0 this is Darknet's
  decay exactly; a warm-up here is linear, and the decay then starts at
  the peak when it ends instead of where Darknet's curve has got to.
  """
  del steps_per_epoch  # Progress is counted in steps.

  def schedule(step):
    progress = _progress_after_warmup(step, warmup_steps, total_steps)
    return config.eta_min + (peak - config.eta_min) * (
        1 - progress) ** config.lr_poly_power

  return schedule


# config.lr_schedule -> the rate after warm-up, from (config, peak,
# steps_per_epoch, warmup_steps, total_steps).
_DECAYS = {'cosine': _cosine_decay, 'step': _step_decay, 'poly': _poly_decay}
LR_SCHEDULES = tuple(_DECAYS)


def _with_warmup(decay: optax.Schedule, peak: float,
                 warmup_steps: int) -> optax.Schedule:
  """``decay`` after the reference's linear warm-up: step i < warmup_steps
  gets peak * (i + 1) / warmup_steps, so the first step already learns."""

  def schedule(step):
    after_warmup = decay(step)
    step = jnp.asarray(step, float)
    warmup = peak * (step + 1) / max(1, warmup_steps)
    return jnp.where(step < warmup_steps, warmup, after_warmup)

  return schedule


def create_learning_rate_schedule(config: ml_collections.ConfigDict,
                                  steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up over ``config.warmup_epochs``, then the decay that
  ``config.lr_schedule`` (one of LR_SCHEDULES) names:

  - 'cosine': to ``config.eta_min``, counted as ``config.cosine_schedule``
    says (``_cosine_decay``);
  - 'step': the peak times ``config.lr_step_decay`` at each of
    ``config.lr_step_epochs`` (``_step_decay``);
  - 'poly': (1 - progress) ** ``config.lr_poly_power`` from the peak down
    to ``config.eta_min``, Darknet's policy (``_poly_decay``).
  """
  peak = peak_learning_rate(config)
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  total_steps = int(config.num_epochs * steps_per_epoch)
  decay = _DECAYS[config.lr_schedule](config, peak, steps_per_epoch,
                                      warmup_steps, total_steps)
  return _with_warmup(decay, peak, warmup_steps)


def weight_decay_mask(params):
  """True for conv and dense kernels; BatchNorm scales and biases are exempt."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def parameter_groups(params):
  """``params``' top-level modules labelled 'head' (the classifier) or
  'backbone' (every other module)."""
  return {name: 'head' if name == model_lib.HEAD else 'backbone'
          for name in params}


def _sgd(config, schedule):
  """Momentum SGD with L2 decay added to the gradient before momentum, as
  the reference's ``Momentum(weight_decay=...)`` and PyTorch's SGD."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
      optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))


def _adamw(config, schedule):
  """optax.adamw: the decay is added to Adam's normalised update."""
  return optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                     eps=config.adam_eps, weight_decay=config.weight_decay,
                     mask=weight_decay_mask)


def _lamb(config, schedule):
  """optax.lamb's chain with its trust ratio masked like the decay."""
  return optax.chain(
      optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2,
                          eps=config.adam_eps),
      optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
      optax.masked(optax.scale_by_trust_ratio(), weight_decay_mask),
      optax.scale_by_learning_rate(schedule))


def _lars(config, schedule):
  """optax.lars with the decay and the trust ratio on kernels only."""
  return optax.lars(schedule, weight_decay=config.weight_decay,
                    weight_decay_mask=weight_decay_mask,
                    trust_coefficient=config.lars_trust_coefficient,
                    trust_ratio_mask=weight_decay_mask,
                    momentum=config.momentum, nesterov=config.nesterov)


# config.optimizer -> its optax transformation, from (config, schedule).
_OPTIMIZERS = {'sgd': _sgd, 'adamw': _adamw, 'lamb': _lamb, 'lars': _lars}
OPTIMIZERS = tuple(_OPTIMIZERS)


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimiser that ``config.optimizer`` (one of OPTIMIZERS) names.

  ``config.weight_decay`` applies to conv and dense kernels only
  (``weight_decay_mask``: BatchNorm scales and biases and dense biases are
  exempt), but in two ways, so its good values differ:

  - 'sgd': coupled L2, wd * w added to the gradient before momentum (the
    reference's ``Momentum(weight_decay=...)``, PyTorch's SGD); 1e-4 to
    5e-4 for ImageNet CNNs.
  - 'adamw', 'lamb': decoupled, wd * w added to Adam's normalised update
    and so multiplied by the learning rate (as PyTorch's AdamW), for LAMB
    before its trust ratio; about 0.05 for AdamW (DeiT's, ConvNeXt's),
    0.01 to 0.02 for LAMB (timm's ResNet Strikes Back recipes).
  - 'lars': wd * w added to the gradient, then the whole scaled by the
    learning rate and the layer's trust ratio, trust_coefficient * ||w|| /
    ||g + wd * w||, before momentum (optax's order); SGD-like values.

  The exempt parameters also skip LAMB's and LARS's trust ratio, as timm's
  ``Lamb`` and ``Lars`` do by default (``always_adapt=False``: decay-free
  parameter groups are not adapted): they get plain Adam or momentum SGD
  steps, where a trust ratio would tie a zero-initialised bias's steps to
  its own small norm.

  For fine-tuning, the backbone's updates are scaled by
  ``config.backbone_lr_multiplier`` (as a PyTorch parameter group with that
  fraction of the learning rate), or with ``config.freeze_backbone`` are
  zero: no step, decay or momentum moves the backbone, and it has no
  optimiser state.
  """
  tx = _OPTIMIZERS[config.optimizer](config, schedule)
  if config.freeze_backbone:
    backbone = optax.set_to_zero()
  elif config.backbone_lr_multiplier != 1.0:
    backbone = optax.chain(tx, optax.scale(config.backbone_lr_multiplier))
  else:
    return tx
  return optax.multi_transform({'head': tx, 'backbone': backbone},
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
