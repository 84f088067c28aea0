"""The allocator restart: its environment, and one real re-exec."""

import os
import platform
import subprocess
import sys

import pytest

from darknet53_jax import allocator

_MIMALLOC = lambda: '/lib/libmimalloc.so'
_NO_MIMALLOC = lambda: None
_NO_ACCELERATOR = lambda: False
_ACCELERATOR = lambda: True


def _not_called():
  raise AssertionError('looked for mimalloc after the choice was made')


def test_mimalloc_is_preloaded_before_the_users_libraries():
  environ = allocator.allocator_environment(
      {'LD_PRELOAD': '/x/libuser.so'}, _MIMALLOC, _NO_ACCELERATOR)
  assert environ == {'LD_PRELOAD': '/lib/libmimalloc.so:/x/libuser.so',
                     'MIMALLOC_PURGE_DELAY': '-1',
                     'DARKNET53_ALLOCATOR': 'mimalloc'}


def test_a_users_mimalloc_setting_is_kept():
  environ = allocator.allocator_environment(
      {'MIMALLOC_PURGE_DELAY': '100'}, _MIMALLOC, _NO_ACCELERATOR)
  assert environ['MIMALLOC_PURGE_DELAY'] == '100'


def test_without_mimalloc_huge_pages_join_the_users_tunables():
  assert allocator.allocator_environment(
      {'A': '1'}, _NO_MIMALLOC, _NO_ACCELERATOR) == {
      'A': '1', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1',
      'DARKNET53_ALLOCATOR': 'huge_pages'}
  assert allocator.allocator_environment(
      {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'},
      _NO_MIMALLOC, _NO_ACCELERATOR)['GLIBC_TUNABLES'] == (
          'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')


@pytest.mark.parametrize('choice', ['mimalloc', 'huge_pages', 'system'])
def test_no_restart_once_the_choice_is_made(choice):
  assert allocator.allocator_environment(
      {'DARKNET53_ALLOCATOR': choice}, _not_called) is None


@pytest.mark.parametrize('jax_platforms', [None, 'cuda', 'tpu,cpu'])
def test_no_restart_where_jax_runs_on_an_accelerator(jax_platforms):
  environ = {} if jax_platforms is None else {'JAX_PLATFORMS': jax_platforms}
  assert allocator.allocator_environment(environ, _not_called,
                                         _ACCELERATOR) is None


@pytest.mark.parametrize('jax_platforms', ['cpu', 'cpu,cuda'])
def test_jax_platforms_cpu_restarts_even_beside_an_accelerator(jax_platforms):
  environ = allocator.allocator_environment(
      {'JAX_PLATFORMS': jax_platforms}, _MIMALLOC, _ACCELERATOR)
  assert environ['DARKNET53_ALLOCATOR'] == 'mimalloc'


def test_the_pinned_mimalloc_wheel_is_found():
  library = allocator.mimalloc_library()
  assert library is not None and os.path.basename(library) == (
      'libmimalloc.so')


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_restarts_once_in_the_same_process_with_mimalloc_loaded():
  script = ('import os, sys\n'
            'print("pid", os.getpid(), file=sys.stderr)\n'
            'from darknet53_jax import allocator\n'
            'allocator.restart_with_fast_allocator()\n'
            'maps = open("/proc/self/maps").read()\n'
            'print(os.getpid(), os.environ["DARKNET53_ALLOCATOR"],\n'
            '      "libmimalloc" in maps)\n')
  environ = {k: v for k, v in os.environ.items()
             if k not in ('DARKNET53_ALLOCATOR', 'LD_PRELOAD')}
  environ['PYTHONPATH'] = os.path.dirname(os.path.dirname(__file__))
  environ['JAX_PLATFORMS'] = 'cpu'  # Restarts on an accelerator host too.
  result = subprocess.run([sys.executable, '-c', script], env=environ,
                          capture_output=True, text=True, check=True)
  started = result.stderr.split()
  assert started.count('pid') == 2  # The script ran twice: one restart.
  pid, choice, loaded = result.stdout.split()
  assert pid == started[1] == started[3]
  assert (choice, loaded) == ('mimalloc', 'True')
