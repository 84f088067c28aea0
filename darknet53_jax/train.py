"""Train state and the data-parallel train and eval steps (no TensorFlow).

Both steps run under ``jax.shard_map`` over a one-axis mesh named ``data``:
each device sees its slice of the global batch, gradients are averaged across
the axis, and BatchNorm batch statistics are either synchronised across the
axis (``config.sync_batch_norm``, so N devices compute exactly what one device
would on the same global batch) or per device and averaged after the step.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import dynamic_scale as dynamic_scale_lib
from flax.training import train_state
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from darknet53_jax import image_ops
from darknet53_jax import model as model_lib
from darknet53_jax import optim

DATA_AXIS = 'data'
# The smallest input the model takes: its parameters do not depend on the
# image size, so initialising at it keeps init's forward pass cheap.
INIT_SIZE = 32
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}


class TrainState(train_state.TrainState):
  """Params, optimiser state and step, plus BatchNorm statistics and the
  float16 loss scale (``None`` for float32 and bfloat16)."""
  batch_stats: Any = None
  dynamic_scale: dynamic_scale_lib.DynamicScale | None = None


def create_mesh(devices=None) -> Mesh:
  """A one-axis ``data`` mesh over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def compute_dtype(config: ml_collections.ConfigDict):
  if config.dtype not in DTYPES:
    raise ValueError(f'config.dtype={config.dtype!r} is not one of '
                     f'{sorted(DTYPES)}.')
  return DTYPES[config.dtype]


def create_model(config: ml_collections.ConfigDict,
                 num_classes: int) -> model_lib.Darknet53:
  """The Darknet-53 that ``config.model`` describes."""
  m = config.model
  return model_lib.Darknet53(
      num_classes=num_classes, activation=m.activation,
      negative_slope=m.negative_slope, width_multiplier=m.width_multiplier,
      stage_depths=tuple(m.stage_depths), dtype=compute_dtype(config),
      bn_momentum=m.bn_momentum, bn_epsilon=m.bn_epsilon,
      bn_axis_name=DATA_AXIS if config.sync_batch_norm else None,
      cpu_matmul_convs=m.cpu_matmul_convs)


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict,
                       model: model_lib.Darknet53,
                       tx: optax.GradientTransformation) -> TrainState:
  """Initialises the variables, optimiser and (for float16) the loss scale."""
  variables = model.init(
      rng, jnp.zeros((1, INIT_SIZE, INIT_SIZE, 3), jnp.float32), train=False)
  scale = None
  if config.dtype == 'float16':
    scale = dynamic_scale_lib.DynamicScale(
        growth_factor=2.0, backoff_factor=0.5,
        growth_interval=config.loss_scale_growth_interval,
        scale=jnp.asarray(config.loss_scale, jnp.float32))
  return TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      batch_stats=variables['batch_stats'], tx=tx, dynamic_scale=scale)


def create_replicated_train_state(rng, config, model, tx, mesh) -> TrainState:
  """``create_train_state``, jitted and replicated over the mesh."""
  init = functools.partial(create_train_state, config=config, model=model,
                           tx=tx)
  # It runs once: on CPUs, XLA's lowest optimisation level compiles it 3
  # times faster (7 s instead of 20 s at the quick start's size), and moves
  # its random values by at most one float32 ulp.
  on_cpu = mesh.devices.flat[0].platform == 'cpu'
  options = {'xla_backend_optimization_level': 0} if on_cpu else None
  return jax.jit(init, out_shardings=NamedSharding(mesh, P())).lower(
      rng).compile(options)(rng)


def image_normalizer(config: ml_collections.ConfigDict):
  """``image_ops.normalize`` with the config's mean, std and dtype."""
  return functools.partial(image_ops.normalize, mean_rgb=config.mean_rgb,
                           std_rgb=config.std_rgb,
                           dtype=compute_dtype(config))


def train_step(state: TrainState, batch, *, learning_rate_fn,
               label_smoothing: float, sync_batch_norm: bool, normalize):
  """One SGD step on this device's slice of the global batch.

  ``batch`` holds uint8 'image's, int 'label's and, with colour jitter, its
  per-image 'color_jitter' factors; ``normalize`` (``image_normalizer``)
  turns the images into the model's input.

  The loss is the global-batch mean (``pmean`` over the axis). The params
  enter the loss cast to device-varying float32 values; the transpose of
  that cast sums their gradients over the axis, in float32 whatever the
  compute dtype, so they are global-mean gradients, identical on every
  device.

  A step whose gradients are not finite changes no parameter, statistic or
  optimiser state (only ``step`` and the loss scale move), and reports
  ``finite = 0``.
  """
  images = normalize(batch['image'], jitter=batch.get('color_jitter'))

  def loss_fn(params):
    # Device-varying float32 params: the cross-device sum of their gradients
    # (the transpose of this cast) runs in float32, before the model casts
    # them to the compute dtype.
    params = lax.pcast(params, DATA_AXIS, to='varying')
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats},
        images, train=True, mutable=['batch_stats'])
    loss = optim.cross_entropy(logits, batch['label'], label_smoothing).mean()
    return lax.pmean(loss, DATA_AXIS), (logits, updates['batch_stats'])

  metrics = {}
  if state.dynamic_scale is not None:
    grad_fn = state.dynamic_scale.value_and_grad(loss_fn, has_aux=True)
    new_scale, finite, (loss, (logits, batch_stats)), grads = grad_fn(
        state.params)
    metrics['loss_scale'] = new_scale.scale
  else:
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    new_scale = None
  if not sync_batch_norm:
    batch_stats = lax.pmean(batch_stats, DATA_AXIS)
  finite = jnp.isfinite(loss)
  for g in jax.tree.leaves(grads):
    finite &= jnp.all(jnp.isfinite(g))

  # One branch over the whole update, not a jnp.where per leaf: with the
  # selects XLA:CPU compiled the step in 65 s instead of 19 s at the quick
  # start's size (docs/performance.md).
  new_state = lax.cond(
      finite,
      lambda: state.apply_gradients(grads=grads, batch_stats=batch_stats),
      lambda: state.replace(step=state.step + 1))
  new_state = new_state.replace(dynamic_scale=new_scale)

  top1 = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  metrics.update(
      loss=loss, top1=lax.pmean(top1, DATA_AXIS),
      learning_rate=learning_rate_fn(state.step),
      finite=finite.astype(jnp.float32))
  return new_state, metrics


def eval_step(state: TrainState, batch, *, normalize):
  """Sums of loss, top-1 and top-5 hits over the examples with mask 1."""
  logits = state.apply_fn(
      {'params': state.params, 'batch_stats': state.batch_stats},
      normalize(batch['image']), train=False)
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
      normalize=image_normalizer(config))
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                          out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=0)


def make_eval_step(mesh: Mesh, config: ml_collections.ConfigDict):
  """The jitted, sharded eval step: (state, global batch) -> metric sums."""
  step = functools.partial(eval_step, normalize=image_normalizer(config))
  sharded = jax.shard_map(step, mesh=mesh,
                          in_specs=(P(), P(DATA_AXIS)), out_specs=P())
  return jax.jit(sharded)


def global_batch(mesh: Mesh, local_batch) -> Any:
  """Makes one global array per field from each process's local slice."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)
