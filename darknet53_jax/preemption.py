"""Stop requests: SIGTERM and SIGINT become "checkpoint and stop after this
step" instead of killing the run mid-write.

With several processes every process must stop at the same step, so the
request comes from JAX's preemption sync point (the coordination service
relays the SIGTERM that reached any process); a single process uses its own
signal handlers.
"""

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
    self._previous = {}

  def __enter__(self):
    if (jax.process_count() == 1 and
        threading.current_thread() is threading.main_thread()):
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._record)
    return self

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _record(self, signum, frame):
    del frame
    self.signum = signum

  def requested(self, step: int) -> bool:
    """Whether to stop after ``step``; the same answer on every process."""
    if jax.process_count() > 1:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = signal.SIGTERM
    return self.signum is not None
