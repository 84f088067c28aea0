"""Multi-process tests: two processes on localhost, two CPU devices each.

The processes run ``python -m darknet53_jax.main`` and talk through JAX's
coordination service and gloo CPU collectives (the CPU default, so no
``jax_cpu_collectives_implementation`` setting is needed). XLA reads the
forced device count once, at start-up, so every multi-device run is a
subprocess; the single-process reference runs this file as a script.

Each process trains on its own ``tfds.even_splits`` share of the data, so a
two-process run's global batch is the concatenation of two per-process
streams, not what one process would read. The reference therefore feeds one
process with four devices exactly those concatenated batches: the same
per-device data, so the parameters may differ only by reduction order.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from darknet53_jax import distributed
from tests import conftest

REPO = conftest.REPO

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TEST_SPLIT_SIZE = 360  # sklearn_digits 'test'.
EVAL_LINE = re.compile(r'eval at step (\d+): top1 ([\d.]+), top5 ([\d.]+), '
                       r'loss ([\d.]+) on (\d+) examples')
RUN_TIMEOUT_S = 400


def _config(data_dir: str):
  """conftest's tiny config for two steps of 128 (one epoch of 256 images).

  Two steps exercise the gradient and BatchNorm reductions and a momentum
  update. Longer runs are chaotic here: near-constant BatchNorm channels
  amplify reduction-order rounding, so even 1 and 4 devices in one process
  part by 2e-3 relative after three steps and by O(1) after eleven. For the
  same reason the convolutions are XLA's (``cpu_matmul_convs=False``): the
  CPU matmuls round differently with 2 and 4 local devices, which these two
  steps amplify to 1.2e-3.
  """
  config = conftest.tiny_config(data_dir)
  config.model.cpu_matmul_convs = False
  # Jittered images vary continuously, not in uint8 steps: fewer exact ties
  # (a ReLU input at 0, a constant channel) for rounding to flip.
  config.color_jitter = 0.4
  config.train_split = 'train[:256]'
  config.num_epochs = 1
  return config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _main(*args: str) -> list[str]:
  return [sys.executable, '-m', 'darknet53_jax.main', *args]


def _eval_lines(log: str) -> list[tuple]:
  return [(int(m[1]), float(m[2]), float(m[3]), float(m[4]), int(m[5]))
          for m in EVAL_LINE.finditer(log)]


def _flat_arrays(variables: dict) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def reference_run(data_dir: str, output: str) -> None:
  """Trains like the two-process run, on one process and all its devices.

  Mirrors ``train_loop.train_and_evaluate`` with process_count 2: the same
  schedule, initial state and per-process streams, concatenated in process
  order (the order of ``jax.devices()`` in the two-process run).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from darknet53_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from darknet53_jax.datasets import registry  # pylint: disable=g-import-not-at-top
  from darknet53_jax import build  # pylint: disable=g-import-not-at-top
  from darknet53_jax import sharding  # pylint: disable=g-import-not-at-top
  config = _config(data_dir)
  builder = registry.get_builder(config)
  local_batch = config.batch_size // NUM_PROCESSES
  steps = input_pipeline.train_steps_per_epoch(builder, config, local_batch,
                                               NUM_PROCESSES)
  mesh = sharding.create_mesh()
  run = build.training(config, mesh, steps)
  state = run.state
  streams = [input_pipeline.create_train_iterator(
      builder, config, local_batch, 0, i, NUM_PROCESSES)
             for i in range(NUM_PROCESSES)]
  for _ in range(steps * config.num_epochs):
    parts = [next(s) for s in streams]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, _ = run.train_step(state, sharding.global_batch(mesh, batch))
  np.savez(output, devices=len(jax.devices()), **_flat_arrays(
      jax.device_get({'params': state.params,
                      'batch_stats': state.batch_stats})))


def _run_processes(runs: list[tuple[list[str], dict]],
                   timeout: float) -> tuple[list[int], list[str]]:
  """Runs (command, environment) pairs concurrently; kills them all if one
  overruns."""
  start = time.perf_counter()
  procs = [subprocess.Popen(command, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
           for command, env in runs]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=max(
          1.0, timeout - (time.perf_counter() - start)))[0])
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  return [p.returncode for p in procs], logs


@pytest.fixture(scope='module')
def two_process_run(digits_data_dir, tmp_path_factory):
  """Trains with 2 processes x 2 devices and, alongside, the one-process
  reference with 4 devices.

  Returns:
    (workdir, the two processes' logs, the reference's flat variables).
  """
  workdir = str(tmp_path_factory.mktemp('two_processes'))
  reference = str(tmp_path_factory.mktemp('reference') / 'variables.npz')
  common = conftest.main_flags(_config(digits_data_dir)) + [
      f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{_free_port()}',
      f'--num_processes={NUM_PROCESSES}', '--distributed_timeout=120']
  runs = [(_main(*common, f'--process_id={i}'), conftest.subprocess_env(DEVICES_PER_PROCESS))
          for i in range(NUM_PROCESSES)]
  runs.append(([sys.executable, '-m', 'tests.distributed_test',
                digits_data_dir, reference], conftest.subprocess_env(NUM_PROCESSES * DEVICES_PER_PROCESS)))
  start = time.perf_counter()
  returncodes, logs = _run_processes(runs, RUN_TIMEOUT_S)
  print(f'two-process training and reference: '
        f'{time.perf_counter() - start:.1f} s')
  for code, log in zip(returncodes, logs):
    assert code == 0, log[-5000:]
  with np.load(reference) as data:
    return workdir, logs[:NUM_PROCESSES], {k: data[k] for k in data.files}


def test_two_processes_match_one_process_on_the_same_batches(
    two_process_run):
  from darknet53_jax import checkpoints  # pylint: disable=g-import-not-at-top
  workdir, logs, reference = two_process_run
  for i, log in enumerate(logs):
    assert f'[process {i}/{NUM_PROCESSES}]' in log
    assert f'JAX process {i} of {NUM_PROCESSES}, {DEVICES_PER_PROCESS} local ' \
        f'and {NUM_PROCESSES * DEVICES_PER_PROCESS} global devices' in log
  reference = dict(reference)
  assert int(reference.pop('devices')) == NUM_PROCESSES * DEVICES_PER_PROCESS
  trained = _flat_arrays(checkpoints.load_variables(workdir))
  assert sorted(trained) == sorted(reference)
  difference = conftest.max_relative_difference(trained, reference)
  print(f'max relative difference, 2x2 vs 1x4: {difference:.3g}')
  # Only the order of float32 sums differs (gloo across processes, XLA
  # within one): docs/scale_out.md records 2e-6 after these two steps, in
  # the well-conditioned setting that _config describes.
  assert difference < 1e-5


def test_two_process_eval_counts_every_example_once(two_process_run):
  _, logs, _ = two_process_run
  for log in logs:
    evals = _eval_lines(log)
    assert evals, log[-3000:]
    assert evals[-1][-1] == TEST_SPLIT_SIZE


def test_checkpoint_of_two_processes_evaluates_on_one_device(
    two_process_run, digits_data_dir, tmp_path):
  workdir, logs, _ = two_process_run
  result = subprocess.run(
      _main(*conftest.main_flags(_config(digits_data_dir)),
            f'--workdir={tmp_path}', '--eval_only', f'--checkpoint={workdir}'),
      cwd=REPO, env=conftest.subprocess_env(1), capture_output=True, text=True,
      timeout=RUN_TIMEOUT_S, check=False)
  assert result.returncode == 0, result.stderr[-5000:]
  assert '1 local and 1 global devices' in result.stderr
  (step, top1, top5, loss, count), = _eval_lines(result.stderr)
  assert count == TEST_SPLIT_SIZE
  # The same numbers as the two processes' own eval of their final state.
  trained_step, trained_top1, trained_top5, trained_loss, _ = _eval_lines(
      logs[0])[-1]
  # Up to one example flipped by rounding in a near tie.
  assert step == trained_step
  assert top1 == pytest.approx(trained_top1, abs=1.5 / TEST_SPLIT_SIZE)
  assert top5 == pytest.approx(trained_top5, abs=1.5 / TEST_SPLIT_SIZE)
  assert loss == pytest.approx(trained_loss, rel=1e-3)


def test_unreachable_coordinator_fails_fast_with_one_line(tmp_path):
  start = time.perf_counter()
  result = subprocess.run(
      _main('--config=configs/quickstart.py', f'--workdir={tmp_path}',
            f'--coordinator_address=127.0.0.1:{_free_port()}',
            '--num_processes=2', '--process_id=1', '--distributed_timeout=5'),
      cwd=REPO, env=conftest.subprocess_env(1), capture_output=True,
      text=True, timeout=200, check=False)
  elapsed = time.perf_counter() - start
  assert result.returncode == 1
  # Imports take most of it (a minute on a loaded 2-core machine); the
  # default --distributed_timeout alone would wait 300 s.
  assert elapsed < 150
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: process 1 of 2 cannot reach the coordinator '
                         'at 127.0.0.1:'), result.stderr[-3000:]


def test_timeout_message_tells_unreachable_from_missing_processes():
  with socket.socket() as listening:
    listening.bind(('127.0.0.1', 0))
    listening.listen()
    address = f'127.0.0.1:{listening.getsockname()[1]}'
    assert distributed._timeout_message(  # pylint: disable=protected-access
        address, 2, 0, 5).startswith(
            f'process 0 of 2 reached the coordinator at {address} but not all '
            'processes joined within 5 s')
  assert distributed._timeout_message(  # pylint: disable=protected-access
      address, 2, 1, 5).startswith(
          f'process 1 of 2 cannot reach the coordinator at {address} within '
          '5 s')


@pytest.mark.parametrize('environ, expected', [
    ({}, None),
    ({'SLURM_NTASKS': '1', 'SLURM_STEP_NODELIST': 'n1'}, None),
    ({'SLURM_NTASKS': '8'}, None),  # An sbatch script itself, not srun.
    ({'SLURM_NTASKS': '8', 'SLURM_STEP_NODELIST': 'n[1-2]'}, 'slurm'),
    ({'OMPI_COMM_WORLD_SIZE': '8', 'OMPI_MCA_orte_hnp_uri': 'x'}, 'ompi'),
    ({'TPU_WORKER_HOSTNAMES': 'w0'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1'}, 'tpu'),
])
def test_detect_cluster(environ, expected):
  assert distributed.detect_cluster(environ) == expected


@pytest.mark.parametrize('mode, address, processes, environ, expected', [
    ('auto', None, None, {}, False),
    ('auto', None, 1, {}, False),
    ('auto', 'h:1234', None, {}, True),
    ('auto', None, 2, {}, True),
    ('auto', None, None, {'JAX_COORDINATOR_ADDRESS': 'h:1'}, True),
    ('auto', None, None, {'SLURM_NTASKS': '2', 'SLURM_STEP_NODELIST': 'n'},
     True),
    ('off', 'h:1234', 2, {}, False),
    ('on', None, None, {}, True),
])
def test_should_initialize(mode, address, processes, environ, expected):
  assert distributed.should_initialize(mode, address, processes,
                                       environ) == expected


def test_single_process_does_not_initialize():
  assert not distributed.initialize('auto', environ={})


def test_on_without_a_cluster_stops_with_one_line(tmp_path):
  env = {k: v for k, v in conftest.subprocess_env(1).items()
         if not k.startswith(('SLURM_', 'OMPI_', 'JAX_COORDINATOR'))}
  result = subprocess.run(
      _main('--config=configs/quickstart.py', f'--workdir={tmp_path}',
            '--distributed=on'),
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      'error: Cannot start the JAX distributed runtime (coordinator_address '
      'should be defined): pass --coordinator_address'), result.stderr[-3000:]
  assert 'Traceback' not in result.stderr


LAUNCHERS = ('train_gpu.sh', 'train_slurm.sbatch', 'train_tpu_vm.sh',
             'eval.sh')


@pytest.mark.parametrize('launcher', LAUNCHERS)
def test_launcher_without_arguments_prints_usage(launcher):
  result = subprocess.run(['bash', os.path.join(REPO, 'launch', launcher)],
                          capture_output=True, text=True, timeout=30,
                          check=False)
  assert result.returncode == 2
  assert result.stderr.startswith('usage: ')


def _fake_commands(directory) -> dict:
  """An environment whose python, srun and gcloud print their arguments."""
  for name in ('python', 'srun', 'gcloud'):
    path = directory / name
    path.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    path.chmod(0o755)
  return dict(os.environ, PATH=f'{directory}:{os.environ["PATH"]}')


def _launch(launcher: str, args: list[str], env: dict) -> list[str]:
  return subprocess.run(
      ['bash', os.path.join(REPO, 'launch', launcher), *args],
      capture_output=True, text=True, timeout=30, env=env,
      check=True).stdout.splitlines()


def test_launchers_pass_the_config_and_overrides(tmp_path):
  env = _fake_commands(tmp_path)
  config = f'--config={REPO}/configs/imagenet.py'
  assert _launch('train_gpu.sh', ['/data', 'w', '--config.seed=1'], env) == [
      '-m', 'darknet53_jax.main', config, '--workdir=w',
      '--config.data_dir=/data', '--config.seed=1']
  reference = dict(env, CONFIG='configs/imagenet_reference.py')
  assert _launch('train_gpu.sh', ['/data', 'w'], reference)[2] == (
      f'--config={REPO}/configs/imagenet_reference.py')
  assert _launch('eval.sh', ['/data', '/ckpt'], env) == [
      '-m', 'darknet53_jax.main', config, '--workdir=eval',
      '--config.data_dir=/data', '--eval_only', '--checkpoint=/ckpt']
  slurm = dict(env, SLURM_JOB_ID='7', SLURM_SUBMIT_DIR=REPO,
               SLURM_NTASKS_PER_NODE='1', SLURM_GPUS_ON_NODE='4')
  assert _launch('train_slurm.sbatch', ['/data', 'w'], slurm) == [
      '--kill-on-bad-exit=1', 'python', '-m', 'darknet53_jax.main', config,
      '--workdir=w', '--config.data_dir=/data', '--local_device_ids=0,1,2,3']
  slurm['SLURM_NTASKS_PER_NODE'] = '8'
  assert _launch('train_slurm.sbatch', ['/data', 'w'], slurm)[-1] == (
      '--config.data_dir=/data')
  tpu = _launch('train_tpu_vm.sh', ['tpu', 'zone', 'gs://d', 'gs://w'], env)
  assert tpu[:7] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'tpu',
                     '--zone=zone', '--worker=all']
  assert tpu[7] == (
      '--command=cd darknet53_jax && python3 -m darknet53_jax.main '
      '--config=configs/imagenet.py --workdir=gs://w --config.data_dir=gs://d '
      '--config.dtype=bfloat16 --distributed=on')


def _fake_slurm(directory, exit_on_sigterm: int) -> dict:
  """An environment for train_slurm.sbatch as job 7 whose srun stands for
  the training processes: it runs until scancel passes SIGTERM on, then
  exits with ``exit_on_sigterm``. scancel and scontrol log their arguments to
  ``directory/calls``."""
  commands = {
      'srun': f'trap "exit {exit_on_sigterm}" TERM\n'
              f'echo $$ > {directory}/srun.pid\n'
              'while true; do sleep 0.1; done\n',
      'scancel': f'echo scancel "$@" >> {directory}/calls\n'
                 f'kill -TERM "$(cat {directory}/srun.pid)"\n',
      'scontrol': f'echo scontrol "$@" >> {directory}/calls\n',
  }
  for name, body in commands.items():
    path = directory / name
    path.write_text(f'#!/usr/bin/env bash\n{body}')
    path.chmod(0o755)
  return dict(os.environ, PATH=f'{directory}:{os.environ["PATH"]}',
              SLURM_JOB_ID='7', SLURM_SUBMIT_DIR=REPO,
              SLURM_NTASKS_PER_NODE='8')


@pytest.mark.parametrize('exit_on_sigterm, requeued', [(143, True),
                                                        (1, False)])
def test_slurm_job_passes_sigterm_on_and_requeues_if_checkpointed(
    tmp_path, exit_on_sigterm, requeued):
  job = subprocess.Popen(
      ['bash', os.path.join(REPO, 'launch', 'train_slurm.sbatch'), '/data',
       'w'], env=_fake_slurm(tmp_path, exit_on_sigterm),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not (tmp_path / 'srun.pid').exists() and time.time() < deadline:
    time.sleep(0.1)
  job.send_signal(signal.SIGTERM)  # As SLURM's --signal=B:TERM does.
  _, stderr = job.communicate(timeout=30)
  assert job.returncode == exit_on_sigterm, stderr
  calls = (tmp_path / 'calls').read_text().splitlines()
  assert calls == ['scancel --signal=TERM 7'] + (
      ['scontrol requeue 7'] if requeued else [])


if __name__ == '__main__':
  reference_run(sys.argv[1], sys.argv[2])
