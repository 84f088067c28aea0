"""The train state and the data-parallel train, eval and predict steps.

Each step runs under ``jax.shard_map`` over the ``data`` mesh
(``sharding``): each device sees its slice of the global batch, gradients
are averaged across the axis, and BatchNorm batch statistics are either
synchronised across the axis (``config.sync_batch_norm``, so N devices
compute exactly what one device would on the same global batch) or per
device and averaged after the step. Optionally, the train step mixes each
device's images (``mixing``) and runs its slice as several micro-batches
per update (``config.accumulation_steps``).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from flax.training import dynamic_scale as dynamic_scale_lib
from flax.training import train_state
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from darknet53_jax import ema as ema_lib
from darknet53_jax import image_ops
from darknet53_jax import mixing as mixing_lib
from darknet53_jax import model as model_lib
from darknet53_jax import optim
from darknet53_jax import precision
from darknet53_jax.sharding import DATA_AXIS


class TrainState(train_state.TrainState):
  """Params, optimiser state and step, plus BatchNorm statistics, the
  float16 loss scale (``None`` for float32 and bfloat16) and the moving
  average of the variables (``ema``: ``{'params', 'batch_stats'}``, or
  ``None`` without ``config.ema_decay``), which each applied update moves
  (``ema_lib``)."""
  batch_stats: Any = None
  dynamic_scale: dynamic_scale_lib.DynamicScale | None = None
  ema: Any = None
  ema_decay: float = struct.field(pytree_node=False, default=0.0)
  ema_warmup: bool = struct.field(pytree_node=False, default=False)

  def variables(self) -> dict:
    """The model's variables: ``{'params', 'batch_stats'}``."""
    return {'params': self.params, 'batch_stats': self.batch_stats}

  def apply_gradients(self, *, grads, **kwargs) -> 'TrainState':
    """The optimiser's update, then (with an EMA) the average's."""
    new_state = super().apply_gradients(grads=grads, **kwargs)
    if self.ema is None:
      return new_state
    decay = ema_lib.decay_at(self.step, self.ema_decay, self.ema_warmup)
    return new_state.replace(
        ema=ema_lib.update(self.ema, new_state.variables(), decay))

  def with_variables(self, variables: dict) -> 'TrainState':
    """This state with other params and BatchNorm statistics, and its EMA (if
    any) restarted from them."""
    ema = None if self.ema is None else jax.tree.map(jnp.copy, variables)
    return self.replace(params=variables['params'],
                        batch_stats=variables['batch_stats'], ema=ema)

  def ema_state(self) -> 'TrainState':
    """This state with the EMA's variables in place of the live ones (to
    evaluate them)."""
    return self.replace(params=self.ema['params'],
                        batch_stats=self.ema['batch_stats'])


def image_normalizer(config: ml_collections.ConfigDict):
  """``image_ops.normalize`` with the config's mean, std and dtype."""
  return functools.partial(image_ops.normalize, mean_rgb=config.mean_rgb,
                           std_rgb=config.std_rgb,
                           dtype=precision.compute_dtype(config))


def _frozen_backbone(params):
  """``params`` with every module but the head cut from the gradient."""
  return {name: value if name == model_lib.HEAD else lax.stop_gradient(value)
          for name, value in params.items()}


def _accumulated_gradients(micro_step, state: TrainState, batch, count: int,
                           freeze_backbone: bool):
  """Runs this device's slice of ``batch`` as ``count`` micro-batches in
  sequence (one micro-batch's activations at a time) and averages them.

  Each micro-batch's loss enters the gradient weighted by 1 / (count x
  devices), times the float16 loss scale: its gradients are those that
  count x as many devices would compute, and the scale guards them as it
  would there. They are summed in float32 over the micro-batches, then once
  over the devices. Each micro-batch updates the running BatchNorm
  statistics from the same starting ones; their mean is the step's (so one
  device equals ``count`` devices with ``sync_batch_norm=False``); a frozen
  backbone leaves them as they are.

  Args:
    micro_step: (device-varying params, micro-batch, its index) -> (this
      device's mean loss, (top-1, BatchNorm statistics)).
    state: the train state.
    batch: this device's slice, whose size ``count`` divides.
    count: the number of micro-batches.
    freeze_backbone: whether BatchNorm runs in eval mode.

  Returns:
    (the new loss scale or None, the global mean loss, (this device's
    top-1, the BatchNorm statistics), the global mean gradients).
  """
  micro_batches = jax.tree.map(
      lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), batch)
  params = lax.pcast(state.params, DATA_AXIS, to='varying')
  scale = 1.0 if state.dynamic_scale is None else state.dynamic_scale.scale
  weight = scale / (count * lax.axis_size(DATA_AXIS))

  def accumulate(grad_sum, micro_batch_and_index):
    def weighted_loss(params):
      loss, aux = micro_step(params, *micro_batch_and_index)
      return loss * weight, (loss, aux)

    grads, outputs = jax.grad(weighted_loss, has_aux=True)(params)
    return jax.tree.map(jnp.add, grad_sum, grads), outputs

  zeros = lax.pcast(jax.tree.map(jnp.zeros_like, state.params), DATA_AXIS,
                    to='varying')
  grads, (losses, (top1, batch_stats)) = lax.scan(
      accumulate, zeros, (micro_batches, jnp.arange(count)))
  grads = lax.psum(grads, DATA_AXIS)
  loss = lax.pmean(jnp.mean(losses), DATA_AXIS)
  batch_stats = (state.batch_stats if freeze_backbone else
                 jax.tree.map(lambda x: jnp.mean(x, 0), batch_stats))
  new_scale = None
  if state.dynamic_scale is not None:
    grads = jax.tree.map(lambda g: g / scale, grads)
    new_scale = precision.update_loss_scale(
        state.dynamic_scale, precision.all_finite(loss, grads))
  return new_scale, loss, (jnp.mean(top1), batch_stats), grads


def train_step(state: TrainState, batch, *, learning_rate_fn,
               label_smoothing: float, sync_batch_norm: bool,
               skip_nonfinite_updates: bool, freeze_backbone: bool,
               normalize, mixing: mixing_lib.Mixing | None = None,
               accumulation_steps: int = 1):
  """One optimiser step on this device's slice of the global batch.

  ``batch`` holds uint8 'image's, int 'label's and, with colour jitter, its
  per-image 'color_jitter' factors; ``normalize`` (``image_normalizer``)
  turns the images into the model's input.

  The loss is the global-batch mean (``pmean`` over the axis). The params
  enter the loss cast to device-varying float32 values; the transpose of
  that cast sums their gradients over the axis, in float32 whatever the
  compute dtype, so they are global-mean gradients, identical on every
  device.

  A step whose loss or gradients are not finite reports ``finite = 0``
  and, with ``skip_nonfinite_updates``, changes no parameter, statistic or
  optimiser state (only ``step`` and the loss scale move); without it, it is
  applied as it is (``precision.apply_if_finite``).

  ``freeze_backbone`` (a linear probe) runs the model in eval mode, so
  BatchNorm normalises with its running statistics and leaves them as they
  are (the head, one Dense layer, is the same in both modes), and
  differentiates the head only; the optimiser leaves the backbone as it is
  (``optim.create_optimizer``).

  ``mixing`` (``mixing.from_config``) mixes the normalised images of each
  device's slice, or of each micro-batch, by its own draw; the targets are
  the draw's mix of the label-smoothed one-hots, and top-1 counts the label
  of the larger weight. ``accumulation_steps`` > 1 runs the slice as that
  many micro-batches and applies their mean gradient
  (``_accumulated_gradients``).
  """
  def inputs(micro_batch, index):
    """The model's input, the labels, and the mix's lam (None: unmixed)."""
    images = normalize(micro_batch['image'],
                       jitter=micro_batch.get('color_jitter'))
    if mixing is None:
      return images, micro_batch['label'], None
    images, lam = mixing_lib.mix(
        mixing_lib.draw_key(mixing.seed, state.step,
                            lax.axis_index(DATA_AXIS), index),
        images, mixing)
    return images, micro_batch['label'], lam

  def forward(params, images, labels, lam):
    """This device's mean loss and (logits, BatchNorm statistics)."""
    if freeze_backbone:
      params = _frozen_backbone(params)
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats},
        images, train=not freeze_backbone, mutable=['batch_stats'])
    if lam is None:
      loss = optim.cross_entropy(logits, labels, label_smoothing)
    else:
      loss = optax.softmax_cross_entropy(logits, mixing_lib.mix_targets(
          optim.smoothed_one_hot(labels, logits.shape[-1], label_smoothing),
          lam))
    return loss.mean(), (logits, updates['batch_stats'])

  def top1(logits, labels, lam):
    if lam is not None:
      labels = mixing_lib.dominant_labels(labels, lam)
    return jnp.mean(jnp.argmax(logits, -1) == labels)

  metrics = {}
  if accumulation_steps > 1:
    def micro_step(params, micro_batch, index):
      model_inputs = inputs(micro_batch, index)
      loss, (logits, batch_stats) = forward(params, *model_inputs)
      return loss, (top1(logits, *model_inputs[1:]), batch_stats)

    new_scale, loss, (top1_mean, batch_stats), grads = _accumulated_gradients(
        micro_step, state, batch, accumulation_steps, freeze_backbone)
  else:
    images, labels, lam = inputs(batch, 0)

    def loss_fn(params):
      # Device-varying float32 params: the cross-device sum of their
      # gradients (the transpose of this cast) runs in float32, before the
      # model casts them to the compute dtype.
      params = lax.pcast(params, DATA_AXIS, to='varying')
      loss, aux = forward(params, images, labels, lam)
      return lax.pmean(loss, DATA_AXIS), aux

    if state.dynamic_scale is not None:
      grad_fn = state.dynamic_scale.value_and_grad(loss_fn, has_aux=True)
      new_scale, _, (loss, (logits, batch_stats)), grads = grad_fn(
          state.params)
    else:
      (loss, (logits, batch_stats)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params)
      new_scale = None
    top1_mean = top1(logits, labels, lam)
  if new_scale is not None:
    metrics['loss_scale'] = new_scale.scale
  if not sync_batch_norm:
    batch_stats = lax.pmean(batch_stats, DATA_AXIS)
  finite = precision.all_finite(loss, grads)
  new_state = precision.apply_if_finite(state, finite, grads, batch_stats,
                                       skip_nonfinite_updates)
  new_state = new_state.replace(dynamic_scale=new_scale)

  metrics.update(
      loss=loss, top1=lax.pmean(top1_mean, DATA_AXIS),
      learning_rate=learning_rate_fn(state.step),
      finite=finite.astype(jnp.float32))
  return new_state, metrics


def predict_step(state: TrainState, images, *, normalize):
  """The logits of uint8 images, with BatchNorm's running statistics."""
  return state.apply_fn(state.variables(), normalize(images), train=False)


def eval_step(state: TrainState, batch, *, normalize):
  """Sums of loss, top-1 and top-5 hits over the examples with mask 1."""
  logits = predict_step(state, batch['image'], normalize=normalize)
  mask = batch['mask'].astype(jnp.float32)
  labels = batch['label']
  loss = optim.cross_entropy(logits, labels)
  top5 = lax.top_k(logits, min(5, logits.shape[-1]))[1]
  sums = {
      'loss': jnp.sum(loss * mask),
      'top1': jnp.sum((top5[:, 0] == labels) * mask),
      'top5': jnp.sum(jnp.any(top5 == labels[:, None], -1) * mask),
      'num_examples': jnp.sum(mask),
  }
  return lax.psum(sums, DATA_AXIS)


def make_train_step(mesh: Mesh, config: ml_collections.ConfigDict,
                    learning_rate_fn):
  """The jitted, sharded train step: (state, global batch) -> (state, metrics).

  The state argument is donated: do not use it after the call.
  """
  step = functools.partial(
      train_step, learning_rate_fn=learning_rate_fn,
      label_smoothing=config.label_smoothing,
      sync_batch_norm=config.sync_batch_norm,
      skip_nonfinite_updates=config.skip_nonfinite_updates,
      freeze_backbone=config.freeze_backbone,
      normalize=image_normalizer(config),
      mixing=mixing_lib.from_config(config),
      accumulation_steps=config.accumulation_steps)
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                          out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=0)


def make_eval_step(mesh: Mesh, config: ml_collections.ConfigDict):
  """The jitted, sharded eval step: (state, global batch) -> metric sums."""
  step = functools.partial(eval_step, normalize=image_normalizer(config))
  sharded = jax.shard_map(step, mesh=mesh,
                          in_specs=(P(), P(DATA_AXIS)), out_specs=P())
  return jax.jit(sharded)


def make_predict_step(mesh: Mesh, config: ml_collections.ConfigDict):
  """The jitted, sharded predict step: (state, global uint8 images) ->
  logits, split over the devices as the images are."""
  step = functools.partial(predict_step, normalize=image_normalizer(config))
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                          out_specs=P(DATA_AXIS))
  return jax.jit(sharded)
