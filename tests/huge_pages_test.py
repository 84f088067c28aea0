"""The huge-pages restart: its environment, and one real re-exec."""

import os
import platform
import subprocess
import sys

import pytest

from darknet53_jax import huge_pages


def test_tunable_is_added_to_the_users_tunables():
  assert huge_pages.environment_with_huge_pages({'A': '1'}) == {
      'A': '1', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  assert huge_pages.environment_with_huge_pages(
      {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})['GLIBC_TUNABLES'] == (
          'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')


@pytest.mark.parametrize('tunables', ['glibc.malloc.hugetlb=1',
                                      'glibc.malloc.hugetlb=0'])
def test_no_restart_once_the_tunable_is_named(tunables):
  assert huge_pages.environment_with_huge_pages(
      {'GLIBC_TUNABLES': tunables}) is None


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_restarts_once_in_the_same_process_with_the_tunable():
  script = ('import os, sys\n'
            'print("pid", os.getpid(), file=sys.stderr)\n'
            'from darknet53_jax import huge_pages\n'
            'huge_pages.restart_with_huge_pages()\n'
            'print(os.getpid(), os.environ["GLIBC_TUNABLES"])\n')
  environ = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  environ['PYTHONPATH'] = os.path.dirname(os.path.dirname(__file__))
  result = subprocess.run([sys.executable, '-c', script], env=environ,
                          capture_output=True, text=True, check=True)
  started = result.stderr.split()
  assert started.count('pid') == 2  # The script ran twice: one restart.
  pid, tunables = result.stdout.split()
  assert pid == started[1] == started[3]
  assert tunables == 'glibc.malloc.hugetlb=1'
