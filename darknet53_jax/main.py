r"""Trains or evaluates Darknet-53.

  python -m darknet53_jax.main --config=configs/imagenet.py --workdir=DIR \
      [--config.KEY=VALUE ...] [--eval_only] [--checkpoint=PATH]
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from darknet53_jax import checkpoints
from darknet53_jax import config_checks
from darknet53_jax import input_pipeline
from darknet53_jax import trainer

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.DEFINE_bool('eval_only', False,
                  'Evaluate the latest checkpoint (or --checkpoint); no '
                  'training.')
flags.DEFINE_string('checkpoint', None,
                    'Checkpoint to evaluate with --eval_only (a workdir, its '
                    'checkpoints/ folder or a step folder).')
config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])

USER_ERRORS = (config_checks.ConfigError, input_pipeline.DataError,
               checkpoints.CheckpointError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # tf.data must never take accelerator memory.
  tf.config.set_visible_devices([], 'GPU')
  logging.info('JAX process %d of %d, %d local and %d global devices (%s).',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  try:
    if FLAGS.eval_only:
      trainer.evaluate_checkpoint(FLAGS.config, FLAGS.workdir,
                                  FLAGS.checkpoint)
    else:
      trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except USER_ERRORS as e:
    logging.error('%s', e)
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
