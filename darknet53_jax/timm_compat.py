"""Imports timm, also beside a CPU-only torch (for tests and benchmarks).

PyPI's torchvision wheels link CUDA libraries: beside a CPU-only torch their
operator library does not load, and importing torchvision then fails with
"operator torchvision::nms does not exist" while registering fake kernels for
nms and qnms. Declaring those two operators lets its pure-Python parts, all
that timm uses here, import. Where torchvision imports (a CUDA machine),
nothing is declared.
"""

from types import ModuleType

_libraries = []  # Keeps the declared operators registered.


def import_timm() -> ModuleType:
  """Returns the timm module.

  Raises:
    ImportError: torch, torchvision or timm is not installed.
  """
  import torch  # pylint: disable=g-import-not-at-top
  try:
    # pylint: disable-next=g-import-not-at-top,unused-import
    import torchvision  # noqa: F401
  except RuntimeError:
    library = torch.library.Library('torchvision', 'DEF')
    for op in ('nms', 'qnms'):
      library.define(
          f'{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    _libraries.append(library)
  import timm  # pylint: disable=g-import-not-at-top
  return timm
