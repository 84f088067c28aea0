"""Joins the JAX multi-process runtime when launched as one of several
processes.

Explicit flags (``--coordinator_address``, ``--num_processes``,
``--process_id``, ``--local_device_ids``) or a detected cluster environment
(SLURM ``srun`` with several tasks, Open MPI ``mpirun``, a multi-host TPU
slice on GKE) start ``jax.distributed.initialize``; ``--distributed=on``
forces it (multi-host Cloud TPU VMs, whose worker list JAX reads from the
metadata server), ``--distributed=off`` never calls it.

A process that cannot join within ``--distributed_timeout`` seconds exits
with a one-line message instead of hanging or dying in a C++ check failure.
Once joined, every log line of a multi-process run starts with
``[process i/n]``.
"""

import logging as python_logging
import os
import socket
import sys
import threading
from collections.abc import Mapping, Sequence

import jax
from absl import flags
from absl import logging

from darknet53_jax import errors

FLAGS = flags.FLAGS
MODES = ('auto', 'on', 'off')
# JAX aborts the process (a C++ check failure) when its own connection
# deadline passes; give it this much longer so the watchdog speaks first.
_JAX_DEADLINE_MARGIN_S = 60


class DistributedError(errors.UserError, RuntimeError):
  """The distributed runtime could not be started as asked."""


def detect_cluster(environ: Mapping[str, str]) -> str | None:
  """The launcher that started several processes, from its environment.

  Args:
    environ: the process environment (``os.environ``).

  Returns:
    'slurm', 'ompi' or 'tpu' when that launcher started more than one
    process (and JAX can read the coordinator from it), else None.
  """
  def count(name: str) -> int:
    return int(environ.get(name, '1') or '1')

  # srun sets SLURM_STEP_NODELIST; a batch script alone has one process.
  if count('SLURM_NTASKS') > 1 and 'SLURM_STEP_NODELIST' in environ:
    return 'slurm'
  if (count('OMPI_COMM_WORLD_SIZE') > 1 and
      'OMPI_MCA_orte_hnp_uri' in environ):
    return 'ompi'
  if len(environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1:
    return 'tpu'
  return None


def should_initialize(mode: str, coordinator_address: str | None,
                      num_processes: int | None,
                      environ: Mapping[str, str]) -> bool:
  """Whether ``mode`` and the flags or environment ask for several processes.

  Args:
    mode: one of ``MODES``.
    coordinator_address: the ``--coordinator_address`` flag.
    num_processes: the ``--num_processes`` flag.
    environ: the process environment.

  Returns:
    True if ``jax.distributed.initialize`` should be called.
  """
  if mode not in MODES:
    raise DistributedError(f'--distributed={mode!r}: use one of {MODES}.')
  if mode != 'auto':
    return mode == 'on'
  return (coordinator_address is not None or (num_processes or 1) > 1 or
          'JAX_COORDINATOR_ADDRESS' in environ or
          detect_cluster(environ) is not None)


def _coordinator_reachable(address: str) -> bool:
  """Whether a TCP connection to ``host:port`` opens within two seconds."""
  host, _, port = address.rpartition(':')
  try:
    with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
      return True
  except (OSError, ValueError):
    return False


def _timeout_message(coordinator_address: str | None,
                     num_processes: int | None, process_id: int | None,
                     timeout_s: int) -> str:
  who = ('this process' if process_id is None else
         f'process {process_id}' + (
             f' of {num_processes}' if num_processes else ''))
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if address is None:
    return (f'{who} did not join the JAX distributed runtime within '
            f'{timeout_s} s (coordinator address auto-detected): start all '
            'processes, or raise --distributed_timeout.')
  if not _coordinator_reachable(address):
    return (f'{who} cannot reach the coordinator at {address} within '
            f'{timeout_s} s: start process 0 there, and check the host, the '
            'port and the firewall.')
  return (f'{who} reached the coordinator at {address} but not all processes '
          f'joined within {timeout_s} s: start all of them with the same '
          '--coordinator_address and --num_processes, or raise '
          '--distributed_timeout.')


def initialize(mode: str = 'auto', coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None,
               timeout_s: int = 300,
               environ: Mapping[str, str] | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` if this is a multi-process run.

  Must run before anything touches a JAX device. Values left None are
  auto-detected by JAX (SLURM, Open MPI, Cloud TPU, ``JAX_*`` variables).
  If the processes have not all joined after ``timeout_s`` seconds, prints
  one line to stderr and exits the process with status 1.

  Args:
    mode: 'auto', 'on' or 'off' (see ``should_initialize``).
    coordinator_address: host:port of process 0.
    num_processes: the number of processes.
    process_id: this process's index.
    local_device_ids: the local accelerators this process uses.
    timeout_s: seconds to wait for all processes.
    environ: the environment to detect a cluster in (``os.environ``).

  Returns:
    True if the runtime was initialised.

  Raises:
    DistributedError: on arguments JAX rejects or that detect no cluster.
  """
  environ = os.environ if environ is None else environ
  if not should_initialize(mode, coordinator_address, num_processes, environ):
    return False
  joined = threading.Event()

  def watchdog():
    if not joined.wait(timeout_s):
      message = _timeout_message(coordinator_address, num_processes,
                                 process_id, timeout_s)
      logging.error('%s', message)
      print(f'error: {message}', file=sys.stderr, flush=True)
      os._exit(1)  # sys.exit would end only this thread.

  threading.Thread(target=watchdog, name='distributed-watchdog',
                   daemon=True).start()
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id,
        local_device_ids=(None if local_device_ids is None else
                          list(local_device_ids)),
        initialization_timeout=timeout_s + _JAX_DEADLINE_MARGIN_S)
  except (ValueError, TypeError) as e:
    raise DistributedError(
        f'Cannot start the JAX distributed runtime ({str(e).rstrip(".")}): '
        'pass --coordinator_address, --num_processes and --process_id, or '
        'launch with srun, mpirun or on every TPU VM worker.') from None
  finally:
    joined.set()
  tag_logs(jax.process_index(), jax.process_count())
  logging.info('Joined the JAX distributed runtime: process %d of %d.',
               jax.process_index(), jax.process_count())
  return True


class _ProcessFormatter(logging.PythonFormatter):
  """absl's log format with ``[process i/n]`` in front."""

  def __init__(self, tag: str):
    super().__init__()
    self._tag = tag

  def format(self, record: python_logging.LogRecord) -> str:
    return f'{self._tag} {super().format(record)}'


def tag_logs(process_index: int, process_count: int) -> None:
  """Starts every absl log line with ``[process i/n]`` if n > 1."""
  if process_count > 1:
    logging.get_absl_handler().setFormatter(
        _ProcessFormatter(f'[process {process_index}/{process_count}]'))


def define_flags() -> None:
  """The flags that ``initialize_from_flags`` reads; the CLI calls this."""
  flags.DEFINE_enum('distributed', 'auto', MODES,
                    'Join the JAX multi-process runtime: auto (when the '
                    'coordinator flags or a SLURM, Open MPI or TPU-slice '
                    'environment with several processes say so), on, or off.')
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, the same for all processes.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes.')
  flags.DEFINE_integer('process_id', None,
                       'This process: 0 .. num_processes-1.')
  flags.DEFINE_list('local_device_ids', None,
                    'Accelerators this process uses, e.g. 0,1,2,3 (default: '
                    'all; one per process under SLURM or Open MPI).')
  flags.DEFINE_integer('distributed_timeout', 300,
                       'Seconds to wait for all processes to join before '
                       'exiting with an error.', lower_bound=1)
  flags.register_validator(
      'local_device_ids',
      lambda ids: ids is None or all(i.isdigit() for i in ids),
      '--local_device_ids takes device numbers, e.g. 0,1,2,3.')


def initialize_from_flags() -> bool:
  """``initialize`` with this module's flags; exits with a one-line message
  on a DistributedError."""
  ids = FLAGS.local_device_ids
  try:
    return initialize(
        FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
        FLAGS.process_id, None if ids is None else [int(i) for i in ids],
        FLAGS.distributed_timeout)
  except DistributedError as e:
    logging.error('%s', e)
    sys.exit(f'error: {e}')

