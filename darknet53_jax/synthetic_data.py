"""Deterministic synthetic batches made on the devices (no TensorFlow).

A batch has the input pipeline's fields, shapes and dtypes (uint8 NHWC
images, int32 labels, and for eval a mask of ones) and
is generated directly into its ``data``-axis sharding, so benchmarks and
checks measure the model and not the host or the transfer.
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from darknet53_jax import sharding


def batch(mesh: Mesh, batch_size: int, image_size: int, num_classes: int,
          seed: int = 0, with_mask: bool = False) -> dict[str, jax.Array]:
  """One global batch sharded over the mesh's ``data`` axis.

  Args:
    mesh: a mesh with a ``data`` axis whose size divides ``batch_size``.
    batch_size: global batch size.
    image_size: image height and width.
    num_classes: labels are drawn uniformly from ``[0, num_classes)``.
    seed: the same seed gives the same batch on any mesh.
    with_mask: add the eval step's ``mask`` (all ones).

  Returns:
    ``{'image': uint8 [batch_size, image_size, image_size, 3] uniform,
    'label': int32 [batch_size]}``, plus ``'mask': int32 [batch_size]``.
  """
  if batch_size % mesh.shape[sharding.DATA_AXIS]:
    raise ValueError(f'batch_size={batch_size} is not a multiple of the '
                     f'{mesh.shape[sharding.DATA_AXIS]} devices on the '
                     f'{sharding.DATA_AXIS!r} axis.')

  def make(key):
    image_key, label_key = jax.random.split(key)
    fields = {
        'image': jax.random.randint(
            image_key, (batch_size, image_size, image_size, 3), 0, 256,
            jnp.int32).astype(jnp.uint8),
        'label': jax.random.randint(label_key, (batch_size,), 0, num_classes,
                                    jnp.int32),
    }
    if with_mask:
      fields['mask'] = jnp.ones((batch_size,), jnp.int32)
    return fields

  return jax.jit(make, out_shardings=sharding.split_batch(mesh))(
      jax.random.key(seed))


def batches(mesh: Mesh, count: int, batch_size: int, image_size: int,
            num_classes: int, seed: int = 0) -> list[dict[str, jax.Array]]:
  """``count`` distinct train batches, seeded ``seed`` to ``seed+count-1``."""
  return [batch(mesh, batch_size, image_size, num_classes, seed + i)
          for i in range(count)]
