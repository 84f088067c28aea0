"""timm's RandAugment notation, e.g. 'rand-m9-mstd0.5-inc1' (docs/data.md).

Parsed without TensorFlow, so that ``config_lib.validate`` can check
``config.rand_augment`` cheaply before any work starts; the ops themselves
are in ``rand_augment``.
"""

import dataclasses
import math
import re

# timm's _LEVEL_DENOM: magnitude 10 is each op's full strength, and
# magnitudes are clipped to [0, 10] unless 'mmax' raises the bound.
LEVEL_DENOM = 10
# timm: a magnitude std above this means "uniform in [0, magnitude]".
UNIFORM_STD_ABOVE = 100.0


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """One RandAugment policy, with timm's defaults.

  Attributes:
    magnitude: 'm', the mean magnitude, 0-10 (LEVEL_DENOM) for full strength.
    num_ops: 'n', ops drawn (with replacement) per image.
    magnitude_std: 'mstd', the std of the Gaussian noise on the magnitude
      drawn per op; inf: the magnitude is uniform in [0, magnitude].
    magnitude_max: 'mmax', the upper clip of the noisy magnitude.
    increasing: 'inc1', the variants whose strength grows with the
      magnitude (Posterize, Solarize, Color, Contrast, Brightness,
      Sharpness).
    prob: 'p', the probability that a drawn op is applied.
  """
  magnitude: int = LEVEL_DENOM
  num_ops: int = 2
  magnitude_std: float = 0.0
  magnitude_max: int = LEVEL_DENOM
  increasing: bool = False
  prob: float = 0.5


# Section key -> (field, parser of its number).
_SECTIONS = {
    'm': ('magnitude', int),
    'n': ('num_ops', int),
    'mstd': ('magnitude_std', float),
    'mmax': ('magnitude_max', int),
    'inc': ('increasing', int),
    'p': ('prob', float),
}
_SECTION = re.compile(r'([a-z]+)(\d+(?:\.\d+)?)')


def parse(notation: str) -> RandAugmentSpec:
  """'rand' then '-'-separated sections, in any order, each at most once.

  Raises:
    ValueError: saying what is wrong, on a malformed notation.
  """
  head, *sections = notation.split('-')
  if head != 'rand':
    raise ValueError("it must start with 'rand'")
  values = {}
  for section in sections:
    match = _SECTION.fullmatch(section)
    if not match or match[1] not in _SECTIONS:
      raise ValueError(f'unknown section {section!r}')
    key, number = match.groups()
    field, kind = _SECTIONS[key]
    if field in values:
      raise ValueError(f'{key!r} is given twice')
    try:
      values[field] = kind(number)
    except ValueError:
      raise ValueError(f'{section!r}: {key!r} takes an integer') from None
  spec = RandAugmentSpec(**values)
  if spec.num_ops < 1:
    raise ValueError("'n' must be at least 1")
  if spec.magnitude_max < 1:
    raise ValueError("'mmax' must be at least 1")
  if values.get('increasing', 0) not in (0, 1):
    raise ValueError("'inc' must be 0 or 1")
  if not 0 <= spec.prob <= 1:
    raise ValueError("'p' must be in [0, 1]")
  return dataclasses.replace(
      spec, increasing=bool(spec.increasing),
      magnitude_std=(math.inf if spec.magnitude_std > UNIFORM_STD_ABOVE
                     else spec.magnitude_std))
