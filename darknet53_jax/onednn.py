"""oneDNN's convolutions on CPUs, called from XLA through its FFI.

Optional: with the ``onednn`` extra installed (x86-64 Linux), ``conv`` runs
an NHWC/HWIO convolution and its two gradients as oneDNN primitives, which
use the CPU's AMX tile units for bfloat16 where it has them, several times
XLA:CPU's speed there (docs/performance.md). XLA:CPU's own oneDNN paths take
matmuls only, and upcast bfloat16 ones to float32 first.

The first use compiles ``onednn_conv.cc`` against the installed oneDNN with
the system's C++ compiler (``$CXX``, else ``c++``), into
``$XDG_CACHE_HOME/darknet53_jax/onednn`` (one file per source, jaxlib and
oneDNN version; ``~/.cache`` when unset), and registers its handlers with
XLA. Where any of it is missing, ``enabled`` is False and the log says why,
once; ``DARKNET53_ONEDNN=0`` turns it off.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import subprocess
import tempfile

from absl import logging
import jax
from jax import lax
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'onednn_conv.cc')
SWITCH = 'DARKNET53_ONEDNN'
_PASSES = ('forward', 'input_gradient', 'kernel_gradient')
_DTYPES = (np.dtype(np.float32), np.dtype(jax.numpy.bfloat16))


class _Unavailable(Exception):
  """Why the oneDNN convolutions cannot run here."""


def _installed_file(distribution: str, suffix: str) -> str:
  """The path of ``distribution``'s installed file ending in ``suffix``."""
  try:
    dist = importlib.metadata.distribution(distribution)
  except importlib.metadata.PackageNotFoundError:
    raise _Unavailable(f"{distribution} is not installed (pip install "
                       "'darknet53_jax[onednn]')") from None
  for file in dist.files or ():
    path = os.path.normpath(dist.locate_file(file))
    if path.endswith(os.sep + suffix):
      return path
  raise _Unavailable(f'{distribution} has no {suffix}')


def _cache_dir() -> str:
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(cache, 'darknet53_jax', 'onednn')


def _compiled_library() -> str:
  """The handlers' shared library, compiled unless the cache has it."""
  include = os.path.dirname(os.path.dirname(os.path.dirname(
      _installed_file('onednn-devel', 'include/oneapi/dnnl/dnnl.hpp'))))
  lib = os.path.dirname(_installed_file('onednn', 'libdnnl.so'))
  with open(SOURCE, 'rb') as f:
    key = hashlib.sha256(b'\0'.join((
        f.read(), importlib.metadata.version('jaxlib').encode(),
        importlib.metadata.version('onednn').encode()))).hexdigest()[:16]
  path = os.path.join(_cache_dir(), f'onednn_conv_{key}.so')
  if os.path.exists(path):
    return path
  os.makedirs(_cache_dir(), exist_ok=True)
  fd, partial = tempfile.mkstemp(suffix='.so', dir=_cache_dir())
  os.close(fd)
  command = [os.environ.get('CXX', 'c++'), '-O2', '-std=c++17', '-shared',
             '-fPIC', f'-I{jax.ffi.include_dir()}', f'-I{include}', SOURCE,
             f'-L{lib}', '-ldnnl',
             # An RPATH, not a RUNPATH: libdnnl's own libraries lie there too.
             f'-Wl,--disable-new-dtags,-rpath,{lib}', '-o', partial]
  try:
    result = subprocess.run(command, capture_output=True, text=True,
                            check=False)
  except FileNotFoundError:
    os.remove(partial)
    raise _Unavailable(f'no C++ compiler {command[0]!r} (set CXX)') from None
  if result.returncode:
    os.remove(partial)
    raise _Unavailable(f'compiling {SOURCE} failed: '
                       f'{(result.stderr.strip().splitlines() or [""])[-1]}')
  os.replace(partial, path)  # Atomic: concurrent builds leave one whole file.
  return path


@functools.cache
def _unavailable_reason() -> str | None:
  """Loads and registers the handlers once; ``None``, or why they are off."""
  if os.environ.get(SWITCH) == '0':
    return f'{SWITCH}=0'
  try:
    # oneDNN's wheel runs its CPU engine on the OpenCL CPU runtime that it
    # brings along; the OpenCL loader finds it through this variable.
    os.environ.setdefault('OCL_ICD_FILENAMES', _installed_file(
        'intel-opencl-rt', 'libintelocl.so'))
    library = ctypes.CDLL(_compiled_library())
  except (_Unavailable, OSError) as e:
    return str(e)
  message = ctypes.create_string_buffer(512)
  if not library.darknet53_onednn_ready(message, len(message)):
    return f'oneDNN cannot run here: {message.value.decode()}'
  for name in _PASSES:
    target = f'darknet53_onednn_conv_{name}'
    jax.ffi.register_ffi_target(
        target, jax.ffi.pycapsule(getattr(library, target)), platform='cpu')
  return None


def enabled() -> bool:
  """Whether ``conv`` can run here (builds and loads it on the first call)."""
  reason = _unavailable_reason()
  if reason:
    logging.log_first_n(logging.INFO, 'oneDNN convolutions off: %s', 1,
                        reason)
  return reason is None


def takes(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether ``conv`` takes these operands: float32 or bfloat16, one type."""
  return x.dtype == kernel.dtype and x.dtype in _DTYPES and enabled()


def _vary_alike(*operands):
  """Inside ``shard_map``, ``operands`` cast to vary over the same mesh axes
  (an eval step's parameters vary over none), as an XLA convolution's are;
  autodiff sums their gradients back over the axes cast to."""
  varying = [jax.typeof(o).manual_axis_type.varying for o in operands]
  axes = frozenset().union(*varying)
  return [o if v == axes else lax.pcast(o, tuple(axes - v), to='varying')
          for o, v in zip(operands, varying)]


def _call(name, result_shape, dtype, operands, strides, padding):
  """One handler's call on operands that vary alike; so does its result."""
  (top, bottom), (left, right) = padding
  geometry = dict(stride_h=strides[0], stride_w=strides[1], pad_top=top,
                  pad_bottom=bottom, pad_left=left, pad_right=right)
  like = jax.typeof(operands[0])
  result = jax.ShapeDtypeStruct(
      result_shape, dtype, sharding=like.sharding.update(
          spec=(None,) * len(result_shape)) if like.sharding else None,
      manual_axis_type=like.manual_axis_type)
  return jax.ffi.ffi_call(f'darknet53_onednn_conv_{name}', result)(
      *operands, **{k: np.int64(v) for k, v in geometry.items()})


def conv(x, kernel, strides, padding):
  """The NHWC/HWIO convolution of ``x`` (``strides``, ``padding``: pairs)."""
  return _conv(*_vary_alike(x, kernel), tuple(strides),
               tuple(map(tuple, padding)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, padding):
  rows, cols = (
      (size + low + high - taps) // stride + 1 for size, (low, high), taps,
      stride in zip(x.shape[1:3], padding, kernel.shape[:2], strides))
  return _call('forward', (x.shape[0], rows, cols, kernel.shape[3]), x.dtype,
               (x, kernel), strides, padding)


def _conv_forward(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _conv_backward(strides, padding, residuals, dy):
  x, kernel = residuals
  return (_call('input_gradient', x.shape, x.dtype, (dy, kernel), strides,
                padding),
          _call('kernel_gradient', kernel.shape, kernel.dtype, (x, dy),
                strides, padding))


_conv.defvjp(_conv_forward, _conv_backward)
