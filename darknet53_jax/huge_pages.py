"""Huge pages for XLA:CPU's large host buffers.

glibc's malloc maps every allocation of 32 MiB or more afresh and unmaps it
on free, so each train step faults XLA:CPU's large buffers in again, 4 KiB
at a time (about 8,200 faults, 12 ms, per 32 MiB buffer on a 2-core VM).
glibc 2.35 and later take transparent huge pages for those maps with the
``glibc.malloc.hugetlb=1`` tunable: 2 MiB per fault (docs/performance.md:
a 3.65 s train step took 2.82 s at batch 16, 128 px, in one pair of runs).
Tunables are read when a process starts, hence a re-exec.
"""

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'


def environment_with_huge_pages(environ):
  """``environ`` with the tunable added, or None if it already names it."""
  tunables = environ.get('GLIBC_TUNABLES', '')
  if TUNABLE in tunables:
    return None  # Set by this module or chosen by the user (=0 opts out).
  return {**environ,
          'GLIBC_TUNABLES': ':'.join(filter(None, (tunables, TUNABLE + '=1')))}


def restart_with_huge_pages():
  """Re-executes this process with the tunable set; returns if no need.

  A no-op off glibc (where the tunable does not exist) and where
  ``GLIBC_TUNABLES`` already names it, so it restarts at most once. Call it
  first thing in a script's ``__main__`` block: the command line is replayed
  as is (``sys.orig_argv``), in the same process ID.
  """
  environ = environment_with_huge_pages(os.environ)
  if environ is None or platform.libc_ver()[0] != 'glibc':
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environ)
