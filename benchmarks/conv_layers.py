r"""Darknet-53's convolutions one by one: XLA's against ``conv.py``'s.

  python -m benchmarks.conv_layers [--batch_size=16] [--image_size=128] \
      [--width_multiplier=1] [--rounds=5]

For one layer of each shape in Darknet-53 (1x1 and 3x3, stride 1 and 2, at
every stage) times, in float32 on the default device, the forward pass, the
input gradient and the kernel gradient of ``lax.conv_general_dilated``
(``model.cpu_matmul_convs=False``) and of ``conv.conv_general_dilated``
(``True``, the default), and prints a Markdown table in milliseconds (the
best of ``--rounds``) with the network's total, each layer weighted by how
many times it occurs. ``--width_multiplier`` scales the features as
``model.width_multiplier`` does (not the image's three).
"""

import time

from absl import app
from absl import flags

from darknet53_jax import allocator

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch_size', 16, 'Images per call.')
flags.DEFINE_integer('image_size', 128, 'Input height and width.')
flags.DEFINE_float('width_multiplier', 1.0, 'Feature multiplier, as the '
                   "model's.")
flags.DEFINE_integer('rounds', 5, 'Timed calls per measurement (best kept).')

# (stride of the input feature map, in, out, kernel, stride, occurrences).
LAYERS = (
    (1, 3, 32, 3, 1, 1), (1, 32, 64, 3, 2, 1),
    (2, 64, 32, 1, 1, 1), (2, 32, 64, 3, 1, 1), (2, 64, 128, 3, 2, 1),
    (4, 128, 64, 1, 1, 2), (4, 64, 128, 3, 1, 2), (4, 128, 256, 3, 2, 1),
    (8, 256, 128, 1, 1, 8), (8, 128, 256, 3, 1, 8), (8, 256, 512, 3, 2, 1),
    (16, 512, 256, 1, 1, 8), (16, 256, 512, 3, 1, 8),
    (16, 512, 1024, 3, 2, 1),
    (32, 1024, 512, 1, 1, 4), (32, 512, 1024, 3, 1, 4),
)
IMAGE_CHANNELS = 3


def _width(features: int) -> int:
  """``features`` scaled as ``model.Darknet53._width`` scales them."""
  if features == IMAGE_CHANNELS:
    return features
  return max(1, int(round(features * FLAGS.width_multiplier)))


def _best_ms(fn, *args) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(FLAGS.rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best * 1e3


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from darknet53_jax import conv  # pylint: disable=g-import-not-at-top

  def timings(conv_fn, x, kernel, strides):
    pad = kernel.shape[0] // 2
    # Positional up to the feature groups: the two functions name them
    # differently.
    apply = lambda x, k: conv_fn(x, k, (strides, strides),
                                 ((pad, pad), (pad, pad)), (1, 1), (1, 1),
                                 conv.NHWC_HWIO, 1, precision=None)
    forward = jax.jit(apply)
    y = forward(x, kernel)
    grad_x = jax.jit(lambda x, k, dy: jax.vjp(lambda x: apply(x, k), x)[1](
        dy)[0])
    grad_k = jax.jit(lambda x, k, dy: jax.vjp(lambda k: apply(x, k), k)[1](
        dy)[0])
    return (_best_ms(forward, x, kernel),
            _best_ms(grad_x, x, kernel, y), _best_ms(grad_k, x, kernel, y))

  rng = np.random.default_rng(0)
  columns = ('forward', 'input gradient', 'kernel gradient')
  print(f'{jax.devices()[0].device_kind}, float32, batch {FLAGS.batch_size}, '
        f'{FLAGS.image_size} px, width x{FLAGS.width_multiplier}; best of '
        f'{FLAGS.rounds}; ms per call\n')
  print('| layer | times | ' + ' | '.join(
      f'{c} XLA | {c} ours' for c in columns) + ' |')
  print('|---|---:|' + '---:|' * 2 * len(columns))
  totals = np.zeros((len(columns), 2))
  for reduction, c_in, c_out, size, strides, count in LAYERS:
    c_in, c_out = _width(c_in), _width(c_out)
    side = FLAGS.image_size // reduction
    x = jax.numpy.asarray(rng.normal(size=(FLAGS.batch_size, side, side,
                                           c_in)), jax.numpy.float32)
    kernel = jax.numpy.asarray(rng.normal(size=(size, size, c_in, c_out)),
                               jax.numpy.float32)
    both = np.array([timings(fn, x, kernel, strides)
                     for fn in (lax.conv_general_dilated,
                                conv.conv_general_dilated)]).T
    totals += count * both
    print(f'| {side}x{side} {c_in}->{c_out} {size}x{size} /{strides} | '
          f'{count} | ' + ' | '.join(f'{a:.1f} | {b:.1f}' for a, b in both)
          + ' |')
  print('| **network** | | ' + ' | '.join(
      f'**{a:.0f}** | **{b:.0f}**' for a, b in totals) + ' |')


if __name__ == '__main__':
  allocator.restart_with_fast_allocator()
  app.run(main)
