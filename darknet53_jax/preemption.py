"""Stop requests: SIGTERM and SIGINT become "checkpoint and stop after this
step" instead of killing the run mid-write.

With several processes every process must stop at the same step, so the
request comes from JAX's preemption sync point: the coordination service
relays a SIGTERM that reached any process to all of them. It listens to
SIGTERM only (JAX's preemption notifier installs a C handler for it and polls
its flag every second), so a SIGINT is passed on to it as a SIGTERM to the
own process. A single process uses its own signal handlers.
"""

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Training stopped on a signal after checkpointing its last step."""

  def __init__(self, step: int, signum: int):
    super().__init__(
        f'stopped by {signal.Signals(signum).name} at step {step} after '
        'saving a checkpoint there; rerun the same command to resume.')
    self.step = step
    self.exit_status = 128 + signum


class StopRequests:
  """A context that records SIGTERM/SIGINT and answers ``requested(step)``."""

  def __init__(self):
    self.signum = None
    self._relayed = None
    self._previous = {}

  def __enter__(self):
    # Python sets signal handlers in the main thread only.
    if threading.current_thread() is threading.main_thread():
      if jax.process_count() == 1:
        handlers = dict.fromkeys(SIGNALS, self._record)
      else:
        handlers = {signal.SIGINT: self._relay}
      for signum, handler in handlers.items():
        self._previous[signum] = signal.signal(signum, handler)
    return self

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _record(self, signum, frame):
    del frame
    self.signum = signum

  def _relay(self, signum, frame):
    """Hands a signal to JAX's preemption notifier, which hears SIGTERM."""
    del frame
    self._relayed = signum
    os.kill(os.getpid(), signal.SIGTERM)

  def requested(self, step: int) -> bool:
    """Whether to stop after ``step``; the same answer on every process."""
    if jax.process_count() > 1:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self._relayed or signal.SIGTERM
    return self.signum is not None
