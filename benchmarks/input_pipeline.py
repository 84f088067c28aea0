r"""Input-pipeline throughput per CPU core, next to raw JPEG decoding.

  python -m benchmarks.input_pipeline [--cores=1] [--num_images=256] \
      [--seconds=8] [--repeats=3] [--rows=train]

Writes ImageNet-like JPEGs (500x375, quality 90, smooth colour fields with
detail and noise, about 100 kB each, as ImageNet's), prepares them as an
image folder, then measures, pinned to ``--cores`` CPUs:

- ``tf.io.decode_jpeg`` of every file, full decode only (the raw rate);
- ``preprocess_train`` alone on the same in-memory bytes;
- the whole train pipeline (reading the prepared dataset, shuffling,
  batching) with the reference recipe (configs/imagenet.py): random-resized
  crop decoded from the JPEG, flip, resize to 256, uint8, colour-jitter
  factors, batches of 64 (the jitter and normalisation run on the devices);
- the same with RandAugment (rand-m9-mstd0.5-inc1), random erasing (0.25,
  'pixel') and both;
- the whole eval pipeline: the reference (resize 292 bilinear, crop 256) and
  timm's (288 bicubic, crop 256).

Rates are images per CPU-second of the process (images/s per core), and
images per wall-clock second (to compare across ``--cores``), each the
median of ``--repeats`` runs of ``--seconds`` of CPU time, each run on a
freshly built pipeline that is closed after it; the runs of the different
pipelines alternate so that other processes' load affects them alike.
Prints a Markdown table.
"""

import gc
import os
import tempfile
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_integer('cores', 1, 'CPUs to pin the process to.')
flags.DEFINE_integer('num_images', 512, 'Distinct JPEGs to generate.')
flags.DEFINE_float('seconds', 8.0, 'Length of one timed run.')
flags.DEFINE_integer('repeats', 3, 'Timed runs per pipeline (median kept).')
flags.DEFINE_integer('batch_size', 64, 'Per-process batch size.')
flags.DEFINE_list('rows', [], 'Only the pipelines whose names contain one '
                  'of these texts (the raw decode always runs); all if '
                  'empty.')

IMAGE_SIZE = (375, 500)  # (height, width)
# The augmentations measured on top of the reference recipe: timm's usual
# RandAugment and a common random-erasing probability.
RAND_AUGMENT = 'rand-m9-mstd0.5-inc1'
RANDOM_ERASING = 0.25
JPEG_QUALITY = 90
# Each timed run first drains what the pipeline prefetched while idle.
WARM_UP_FRACTION = 0.2


def _photo(rng):
  """A photo-like uint8 image: smooth colours, finer detail, sensor noise."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  height, width = IMAGE_SIZE
  resize = lambda x, method: tf.image.resize(
      x[None].astype(np.float32), IMAGE_SIZE, method)[0].numpy()
  image = (resize(rng.uniform(0, 255, (6, 8, 3)), 'bicubic')
           + resize(rng.normal(0, 30, (height // 2, width // 2, 3)),
                    'bilinear')
           + rng.normal(0, 10, (height, width, 3)))
  return np.clip(image, 0, 255).astype(np.uint8)


def _write_images(root: str, count: int) -> list[bytes]:
  """``count`` JPEGs in root/{train,val}/{a,b}/; returns their bytes."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  encoded = []
  for i in range(count):
    data = tf.io.encode_jpeg(_photo(rng), quality=JPEG_QUALITY).numpy()
    encoded.append(data)
    for split in ('train', 'val'):
      folder = os.path.join(root, split, 'ab'[i % 2])
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, f'{i}.jpg'), 'wb') as f:
        f.write(data)
  return encoded


def _rate(batches, batch_size: int, seconds: float) -> tuple[float, float]:
  """Images per CPU-second of this process, and per wall-second, over
  ``seconds`` of CPU time.

  CPU time rather than wall time for the first: other processes on a shared
  machine slow the wall clock but not the work each image costs. The wall
  rate, compared across ``--cores``, shows how the pipeline scales.
  """
  start = time.process_time()
  while time.process_time() - start < WARM_UP_FRACTION * seconds:
    next(batches)
  count, start, wall = 0, time.process_time(), time.perf_counter()
  while time.process_time() - start < seconds:
    next(batches)
    count += batch_size
  return (count / (time.process_time() - start),
          count / (time.perf_counter() - wall))


def _endless(iterable):
  while True:
    yield from iterable


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Pin before TensorFlow starts its thread pools, which size themselves to
  # the CPUs the process may use.
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:FLAGS.cores])
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from darknet53_jax import config_lib  # pylint: disable=g-import-not-at-top
  from darknet53_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from darknet53_jax.datasets import registry  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory(prefix='pipeline_benchmark_') as workdir:
    encoded = _write_images(os.path.join(workdir, 'images'), FLAGS.num_images)
    config = config_lib.load_file(os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        'configs', 'imagenet.py'))
    config.data_dir = os.path.join(workdir, 'tfds')
    config.dataset = f'image_folder:{workdir}/images'
    config.shuffle_buffer = FLAGS.num_images
    builder = registry.get_builder(config)
    registry.ensure_prepared(builder)
    timm = config.copy_and_resolve_references()
    timm.eval_crop_pct, timm.interpolation = 0.887, 'bicubic'
    batch = FLAGS.batch_size

    def train(**fields):
      """The train pipeline of ``config`` with ``fields`` changed."""
      changed = config.copy_and_resolve_references()
      changed.update(fields)
      return lambda: input_pipeline.create_train_iterator(
          builder, changed, batch, 0, 0, 1)

    def in_memory(fn):
      """fn(image bytes, int64 seed [2]) over the encoded images, batched."""
      ds = tf.data.Dataset.zip(
          tf.data.Dataset.from_tensor_slices(encoded).repeat(),
          tf.data.Dataset.range(np.iinfo(np.int64).max))
      ds = ds.map(lambda image, i: fn(image, tf.stack([i, i])),
                  num_parallel_calls=tf.data.AUTOTUNE)
      return iter(ds.batch(batch).prefetch(tf.data.AUTOTUNE))

    pipelines = {
        'tf.io.decode_jpeg (raw, full decode)': lambda: in_memory(
            lambda image, seed: tf.io.decode_jpeg(image)),
        'preprocess_train alone': lambda: in_memory(
            input_pipeline.train_preprocessing(config)),
        'train pipeline: reference recipe, 256 px': train(),
        f'train pipeline + RandAugment {RAND_AUGMENT}': train(
            rand_augment=RAND_AUGMENT),
        f'train pipeline + random erasing {RANDOM_ERASING}': train(
            random_erasing=RANDOM_ERASING),
        'train pipeline + both': train(rand_augment=RAND_AUGMENT,
                                       random_erasing=RANDOM_ERASING),
        'eval pipeline: reference, resize 292 bilinear, crop 256': lambda: (
            _endless(input_pipeline.create_eval_dataset(
                builder, config, 'validation', batch, 0, 1)[0])),
        'eval pipeline: timm, resize 288 bicubic, crop 256': lambda: (
            _endless(input_pipeline.create_eval_dataset(
                builder, timm, 'validation', batch, 0, 1)[0])),
    }
    raw = next(iter(pipelines))
    pipelines = {name: create for name, create in pipelines.items()
                 if name == raw or not FLAGS.rows
                 or any(text in name for text in FLAGS.rows)}
    rates = {name: [] for name in pipelines}
    for _ in range(FLAGS.repeats):
      for name, create in pipelines.items():
        # A fresh pipeline per run, closed after it: a live one refills its
        # prefetch buffers on this process's CPU time while others run.
        batches = create()
        rates[name].append(_rate(batches, batch, FLAGS.seconds))
        del batches
        gc.collect()

  raw_rate = np.median([cpu for cpu, _ in rates[raw]])
  print(f'{FLAGS.num_images} JPEGs {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}, quality '
        f'{JPEG_QUALITY}, mean {np.mean([len(e) for e in encoded]) / 1e3:.0f}'
        f' kB; pinned to {len(os.sched_getaffinity(0))} core(s); median of '
        f'{FLAGS.repeats} runs of {FLAGS.seconds:g} CPU-seconds.\n')
  print('| pipeline | images per CPU-second | / raw decode | images per '
        'second (wall) |')
  print('|---|---:|---:|---:|')
  for name, values in rates.items():
    rate, wall = np.median(values, axis=0)
    print(f'| {name} | {rate:.0f} | {rate / raw_rate:.2f} | {wall:.0f} |')

if __name__ == '__main__':
  app.run(main)
