r"""Trains or evaluates Darknet-53.

  python -m darknet53_jax.main --config=configs/imagenet.py --workdir=DIR \
      [--config.KEY=VALUE ...] [--eval_only] [--checkpoint=PATH] [--ema]
"""

import gc
import sys

from darknet53_jax import allocator

if __name__ == '__main__':
  allocator.restart_with_fast_allocator()  # Before the slow imports below.
  # Each full collection would scan every object imported so far, more each
  # time: on again once the libraries are in
  # (``runtime.exempt_imports_from_collection``).
  gc.disable()

# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
import logging as logging_std

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from darknet53_jax import build
from darknet53_jax import config_lib
from darknet53_jax import distributed
from darknet53_jax import errors
from darknet53_jax import preemption
from darknet53_jax import runtime
from darknet53_jax import sharding
# pylint: enable=g-import-not-at-top,wrong-import-position,g-bad-import-order

FLAGS = flags.FLAGS


def _load_config():
  """The --config file with its overrides, or exit with one clear line."""
  config = FLAGS.config
  try:
    config.keys()
    return config
  except Exception as e:  # pylint: disable=broad-except
    # A config that failed to load raises on first use, anything the file
    # raised; the chained causes hold the useful part.
    while e.__cause__ is not None:
      e = e.__cause__
    _exit_with_config_error(e)


def _exit_with_config_error(error: Exception):
  reason = ' '.join(str(error).split()) or type(error).__name__
  if isinstance(error, (AttributeError, KeyError)):
    sys.exit(f'error: unknown config key {reason}: see darknet53_jax/config_defaults.py '
             'and the README for the fields.')
  sys.exit(f'error: cannot load --config and its overrides: '
           f'{type(error).__name__}: {reason}')


def _parse_flags(argv):
  """absl's flag parsing, with config-file errors as one line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {str(e).rstrip(".")}. Pass --helpfull to see the '
             'flags.')
  except Exception as e:  # pylint: disable=broad-except
    # Executing the config file or applying an override can raise anything.
    _exit_with_config_error(e)


class _QuietLibraries(logging_std.Filter):
  """Drops orbax's per-save INFO chatter; keeps its warnings."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or 'orbax' not in (
        record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _load_config()
  runtime.configure(config)  # Before anything touches a device.
  distributed.initialize_from_flags()
  logging.info('JAX process %d of %d, %d local and %d global devices (%s).',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  try:
    # Mistakes in the config or the workdir are reported before the seconds
    # of importing TensorFlow (the input pipeline) and orbax, during which
    # the initialisation compiles.
    config_lib.validate(config, jax.device_count(), jax.process_count())
    config_lib.check_workdir_writable(FLAGS.workdir)
    if not FLAGS.eval_only and config.num_classes > 0:
      build.start_compiling_init(config, sharding.create_mesh())
    from darknet53_jax import train_loop  # pylint: disable=g-import-not-at-top
    runtime.exempt_imports_from_collection()
    if FLAGS.eval_only:
      train_loop.evaluate_checkpoint(config, FLAGS.workdir,
                                     FLAGS.checkpoint, FLAGS.ema)
    else:
      train_loop.train_and_evaluate(config, FLAGS.workdir)
  except errors.UserError as e:
    logging.error('%s', e)
    sys.exit(f'error: {e}')
  except preemption.Preempted as e:
    logging.warning('%s', e)
    sys.exit(e.exit_status)


def define_flags() -> None:
  """The CLI's flags, defined only when run so that imports never clash."""
  flags.DEFINE_string('workdir', None,
                      'Directory for checkpoints and metrics.')
  flags.DEFINE_bool('eval_only', False,
                    'Evaluate the latest checkpoint (or --checkpoint); no '
                    'training.')
  flags.DEFINE_string('checkpoint', None,
                      'Checkpoint to evaluate with --eval_only (a workdir, '
                      'its checkpoints/ folder or a step folder), or '
                      "'best': the --workdir's best one.")
  flags.DEFINE_bool('ema', False,
                    'With --eval_only: evaluate the EMA of the weights (a '
                    'run with config.ema_decay > 0), as eval_ema/*.')
  config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                  lock_config=True)
  flags.mark_flags_as_required(['config', 'workdir'])
  distributed.define_flags()
  flags.adopt_module_key_flags(distributed)  # Listed by --help too.


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=_parse_flags)
