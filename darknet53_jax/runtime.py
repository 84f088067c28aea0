"""Process-wide settings: the persistent compilation cache and deterministic
GPU ops, made before the first computation, and the garbage collector's
view of the imported libraries."""

import gc
import hashlib
import os
import platform
import time

from absl import logging
import jax
import ml_collections

# Beyond this the cache evicts its least recently used entries. A bounded
# cache is also a locked one: JAX then reads and writes entries under a file
# lock, so processes sharing the directory never see a half-written entry.
COMPILATION_CACHE_MAX_BYTES = 8 << 30
DETERMINISTIC_GPU_FLAG = '--xla_gpu_deterministic_ops=true'
_IMPORTED = time.monotonic()


def _cpu_fingerprint() -> str:
  """A short hash of this CPU's model and instruction set extensions."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      lines = [line for line in f
               if line.startswith(('model name', 'flags'))][:2]
  except OSError:
    lines = [platform.processor()]
  return hashlib.sha256(''.join(lines).encode()).hexdigest()[:12]


def default_compilation_cache_dir(environ=os.environ) -> str:
  """``$XDG_CACHE_HOME/darknet53_jax/xla/CPU`` (``~/.cache`` when unset).

  JAX's cache key names the device kind, not the host CPU's vector
  extensions, while XLA:CPU compiles for the host's: one folder per CPU kind
  keeps a home directory shared by an AVX2 and an AVX-512 host safe.
  """
  cache = environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(cache, 'darknet53_jax', 'xla', _cpu_fingerprint())


def compilation_cache_dir(config: ml_collections.ConfigDict,
                          environ=os.environ) -> str | None:
  """Where compiled programs are kept; ``None``: nowhere.

  ``config.compilation_cache_dir`` when set ('' turns the cache off), else
  ``JAX_COMPILATION_CACHE_DIR``, else ``default_compilation_cache_dir``.
  """
  directory = config.compilation_cache_dir
  if directory is None:
    directory = (environ.get('JAX_COMPILATION_CACHE_DIR') or
                 default_compilation_cache_dir(environ))
  return os.path.expanduser(directory) or None


def with_deterministic_gpu_ops(xla_flags: str) -> str:
  """``XLA_FLAGS`` with XLA:GPU's deterministic-ops flag added."""
  if DETERMINISTIC_GPU_FLAG in xla_flags.split():
    return xla_flags
  return ' '.join(filter(None, (xla_flags, DETERMINISTIC_GPU_FLAG)))


def configure(config: ml_collections.ConfigDict) -> None:
  """Applies the config's process-wide settings; call before any device is
  touched (XLA reads its flags when the backend starts)."""
  if config.deterministic:
    os.environ['XLA_FLAGS'] = with_deterministic_gpu_ops(
        os.environ.get('XLA_FLAGS', ''))
  directory = compilation_cache_dir(config)
  jax.config.update('jax_compilation_cache_dir', directory)
  if directory is not None:
    jax.config.update('jax_compilation_cache_max_size',
                      COMPILATION_CACHE_MAX_BYTES)
    logging.info('Compilation cache: %s', directory)


def exempt_imports_from_collection() -> None:
  """With the collector off (``main`` turns it off while it imports), moves
  every object alive now out of its later scans (``gc.freeze``) and turns it
  on; with the collector on, as in a process that imported ``main`` (a
  test), does nothing.

  TensorFlow, JAX and their kin import about half a million objects. Each
  full collection would scan them all again (up to 0.2 s; seven during the
  imports alone), and so would the one at exit (over a second). Objects
  made later are collected as usual, and reference counting still frees the
  exempt ones; only garbage cycles among them (about 4,000 objects in
  ``main``, not worth the 0.4 s of a collection to free) stay until the
  exit.
  """
  if not gc.isenabled():
    gc.freeze()
    gc.enable()


def seconds_since_process_start() -> float:
  """Wall time since this process started, imports and the allocator
  restart included (as the kernel counts on Linux; elsewhere since this
  module was imported)."""
  try:
    with open('/proc/self/stat', encoding='ascii') as f:
      # Field 22, counted after the parenthesised command name (field 2).
      start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime', encoding='ascii') as f:
      uptime = float(f.read().split()[0])
  except OSError:
    return time.monotonic() - _IMPORTED
  return uptime - start_ticks / os.sysconf('SC_CLK_TCK')
