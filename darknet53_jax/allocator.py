"""A host memory allocator that keeps XLA:CPU's large buffers mapped.

glibc's malloc maps every allocation of 32 MiB or more afresh and unmaps it
on free, so each train step faults XLA:CPU's large buffers in again, even
with glibc's huge pages. mimalloc (Microsoft's allocator, from the
``cmeel-mimalloc`` wheel), preloaded with purging off, keeps freed memory
for the next allocation (docs/performance.md has the fault counts and
kernel times). Where that wheel is missing, glibc's ``glibc.malloc.hugetlb=1`` tunable at
least faults 2 MiB at a time. Both act when a process starts, hence a
re-exec; ``DARKNET53_ALLOCATOR`` records (or, set by the user, fixes) the
choice: ``mimalloc``, ``huge_pages`` or ``system`` (no change).

Only where JAX will compute on CPUs: on GPU and TPU hosts the host's buffers
are few and small, and keeping all freed memory mapped was never measured
there, so those processes keep the system allocator and are not restarted.
"""

import glob
import importlib.metadata
import os
import platform
import sys

VARIABLE = 'DARKNET53_ALLOCATOR'
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
# Device files of the accelerators JAX has plugins for: NVIDIA GPUs, TPUs
# (/dev/accel* up to v4, VFIO groups from v5e) and AMD GPUs.
ACCELERATOR_DEVICE_FILES = ('/dev/nvidia[0-9]*', '/dev/accel[0-9]*',
                            '/dev/vfio/[0-9]*', '/dev/kfd')


def _path_list(first, rest):
  """``first:rest``, either of them possibly unset."""
  return ':'.join(filter(None, (first, rest)))


def mimalloc_library() -> str | None:
  """The shared library of the installed ``cmeel-mimalloc``, if any."""
  try:
    files = importlib.metadata.files('cmeel-mimalloc') or ()
  except importlib.metadata.PackageNotFoundError:
    return None
  paths = [str(f.locate()) for f in files if f.name == 'libmimalloc.so']
  return next((p for p in paths if os.path.isfile(p)), None)


def accelerator_visible() -> bool:
  """Whether this host shows a GPU or TPU device file."""
  return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


def jax_runs_on_cpu(environ, find_accelerator=accelerator_visible) -> bool:
  """JAX's first choice of platform is the CPU: ``JAX_PLATFORMS`` lists
  ``cpu`` first or, unset, no accelerator is visible."""
  platforms = [p.strip() for p in environ.get('JAX_PLATFORMS', '').split(',')
               if p.strip()]
  if platforms:
    return platforms[0] == 'cpu'
  return not find_accelerator()


def allocator_environment(environ, find_mimalloc=mimalloc_library,
                          find_accelerator=accelerator_visible):
  """``environ`` with the allocator set up, or None when there is nothing
  to do: the choice was made already, or JAX will not run on CPUs.

  Args:
    environ: the current environment.
    find_mimalloc: returns the mimalloc library to preload (``None``: use
      huge pages); only called when there is a choice to make.
    find_accelerator: whether a GPU or TPU is visible (``JAX_PLATFORMS``,
      when set, decides instead).
  """
  if VARIABLE in environ or not jax_runs_on_cpu(environ, find_accelerator):
    return None
  mimalloc = find_mimalloc()
  if mimalloc is not None:
    return {**environ, VARIABLE: 'mimalloc',
            'LD_PRELOAD': _path_list(mimalloc, environ.get('LD_PRELOAD')),
            # Keep freed memory mapped rather than return it after 10 ms.
            'MIMALLOC_PURGE_DELAY': environ.get('MIMALLOC_PURGE_DELAY', '-1')}
  return {**environ, VARIABLE: 'huge_pages',
          'GLIBC_TUNABLES': _path_list(environ.get('GLIBC_TUNABLES'),
                                       HUGE_PAGES_TUNABLE)}


def restart_with_fast_allocator():
  """Re-executes this process with the allocator set up; returns if no need.

  A no-op off glibc-based Linux and where ``DARKNET53_ALLOCATOR`` is set, so
  it restarts at most once. Call it first thing in a script's ``__main__``
  block: the command line is replayed as is (``sys.orig_argv``), in the
  same process ID.
  """
  if platform.libc_ver()[0] != 'glibc':
    return
  environ = allocator_environment(os.environ)
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environ)
