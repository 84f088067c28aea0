"""Tests for darknet53_jax.preemption: stop requests on one and two processes.

The two-process test runs this file as a script in each process: both join
the JAX runtime on localhost and count steps until ``StopRequests`` says
stop, without a model, so it takes seconds.
"""

import os
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import pytest  # noqa: E402

from darknet53_jax import preemption  # noqa: E402
from tests import conftest  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position

READY = 'ready'
STEP_S = 0.05
MAX_STEPS = 2000  # 100 s of steps: the test fails if no stop comes.


@pytest.mark.parametrize('signum', preemption.SIGNALS)
def test_one_process_records_the_signal(signum):
  before = signal.getsignal(signum)
  with preemption.StopRequests() as stop:
    assert not stop.requested(1)
    os.kill(os.getpid(), signum)
    assert stop.requested(2)
    assert stop.signum == signum
  assert signal.getsignal(signum) is before
  assert preemption.Preempted(2, signum).exit_status == 128 + signum


def count_steps(process_id: int, address: str) -> None:
  """One of two processes: steps until asked to stop; prints where."""
  jax.distributed.initialize(address, num_processes=2, process_id=process_id)
  with preemption.StopRequests() as stop:
    for step in range(1, MAX_STEPS):
      if step == 2:
        print(READY, flush=True)
      time.sleep(STEP_S)
      if stop.requested(step):
        print(f'stopped at step {step}', flush=True)
        raise SystemExit(preemption.Preempted(step, stop.signum).exit_status)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_sigint_to_one_of_two_processes_stops_both_at_the_same_step():
  address = f'127.0.0.1:{_free_port()}'
  processes = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), str(i), address],
      cwd=REPO, env=conftest.subprocess_env(1), stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL, text=True) for i in range(2)]
  try:
    for process in processes:
      assert process.stdout.readline().strip() == READY
    processes[1].send_signal(signal.SIGINT)
    outputs = [process.communicate(timeout=60)[0] for process in processes]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  # Each process exits as its own signal says: the one interrupted with
  # 128 + SIGINT, the other with 128 + SIGTERM, which the runtime relayed.
  assert [p.returncode for p in processes] == [128 + signal.SIGTERM,
                                               128 + signal.SIGINT]
  assert outputs[0].startswith('stopped at step ')
  assert outputs[0] == outputs[1]


if __name__ == '__main__':
  count_steps(int(sys.argv[1]), sys.argv[2])
