"""A miniature ImageNet in the real archive layout, for tests.

``ILSVRC2012_img_train.tar`` holds one ``SYNSET.tar`` per class, each of
``SYNSET_N.JPEG`` files; ``ILSVRC2012_img_val.tar`` holds
``ILSVRC2012_val_%08d.JPEG``. tfds's ``imagenet2012`` builder labels the
validation images by their sorted file names from its own
``validation_labels.txt``, and accepts any subset of its 1,000 classes and
50,000 validation names, so the first ``num_val`` names, painted with the
colour of the class tfds gives them, and training images of those classes
make the smallest ImageNet the real builder prepares.

ImageNet's oddities are included: the CMYK JPEG and the PNG-named-.JPEG that
the builder converts (names from its CMYK_IMAGES and PNG_IMAGES), a
grey-scale JPEG, tiny and very elongated images, and one truncated JPEG in
each split (the builder stores it as is; the input pipeline must skip it).
"""

import dataclasses
import io
import os
import tarfile

import numpy as np
from PIL import Image
from tensorflow_datasets.datasets.imagenet2012 import (
    imagenet2012_dataset_builder as imagenet_builder)
import tensorflow_datasets as tfds

TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
CMYK_NAME = imagenet_builder.CMYK_IMAGES[0]
PNG_NAME = imagenet_builder.PNG_IMAGES[0]
VALIDATION_LABELS = 'datasets/imagenet2012/validation_labels.txt'
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's 'L'.
TYPICAL_SIZE = (48, 40)  # (width, height)
# (file-name suffix, PIL mode, (width, height)) of the odd training images.
ODD_TRAIN_IMAGES = (('gray', 'L', TYPICAL_SIZE), ('tiny', 'RGB', (3, 2)),
                    ('wide', 'RGB', (320, 12)), ('tall', 'RGB', (10, 240)))
# Validation image index -> (PIL mode, (width, height)); the rest typical.
ODD_VAL_IMAGES = {1: ('L', TYPICAL_SIZE), 3: ('RGB', (12, 200)),
                  4: ('RGB', (3, 2))}
TRUNCATED_VAL_IMAGE = 2


@dataclasses.dataclass
class FakeImageNet:
  """What was written.

  Attributes:
    manual_dir: the directory holding the two archives.
    train_synsets: the classes with training images.
    num_train: training images, the truncated one included.
    val_synsets: the class of each validation image, in file-name order.
    truncated: the names of the truncated JPEGs (one per split).
    grey: the names of the grey-scale JPEGs.
  """
  manual_dir: str
  train_synsets: list[str]
  num_train: int
  val_synsets: list[str]
  truncated: list[str]
  grey: list[str]


def class_colour(synset: str, grey: bool = False) -> np.ndarray:
  """The RGB colour the images of ``synset`` are painted with."""
  colour = np.random.default_rng(int(synset[1:])).integers(30, 226, 3)
  return np.full(3, colour @ GREY_WEIGHTS) if grey else colour


def _image(synset: str, mode: str, size: tuple[int, int],
           rng: np.random.Generator) -> Image.Image:
  width, height = size
  noise = rng.integers(-20, 21, (height, width, 3))
  pixels = np.clip(class_colour(synset) + noise, 0, 255).astype(np.uint8)
  return Image.fromarray(pixels).convert(mode)


def _encode(image: Image.Image, image_format: str = 'JPEG') -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, image_format, quality=90)
  return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _validation_synsets(count: int) -> list[str]:
  """tfds's classes of the first ``count`` validation file names."""
  with open(tfds.core.tfds_path(VALIDATION_LABELS)) as f:
    return f.read().split()[:count]


def write(manual_dir: str, num_val: int = 12,
          images_per_class: int = 2) -> FakeImageNet:
  """Writes the two archives into ``manual_dir``.

  Args:
    manual_dir: created if missing.
    num_val: validation images (tfds's first ``num_val`` names).
    images_per_class: typical training images per class.

  Returns:
    What was written.
  """
  os.makedirs(manual_dir, exist_ok=True)
  rng = np.random.default_rng(0)
  val_synsets = _validation_synsets(num_val)
  odd_synset = val_synsets[0]
  images = {s: [(f'{s}_{i + 1}.JPEG', _encode(
      _image(s, 'RGB', TYPICAL_SIZE, rng))) for i in range(images_per_class)]
            for s in val_synsets}
  images[odd_synset] += [
      (f'{odd_synset}_{suffix}.JPEG', _encode(_image(odd_synset, mode, size,
                                                     rng)))
      for suffix, mode, size in ODD_TRAIN_IMAGES]
  for name, image_format, mode in ((CMYK_NAME, 'JPEG', 'CMYK'),
                                   (PNG_NAME, 'PNG', 'RGB')):
    synset = name.split('_')[0]
    images.setdefault(synset, []).append(
        (name, _encode(_image(synset, mode, TYPICAL_SIZE, rng), image_format)))
  truncated_train = f'{odd_synset}_truncated.JPEG'
  images[odd_synset].append(
      (truncated_train, images[odd_synset][0][1][:200]))

  with tarfile.open(os.path.join(manual_dir, TRAIN_TAR), 'w') as train_tar:
    for synset, files in sorted(images.items()):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as synset_tar:
        for name, data in files:
          _add(synset_tar, name, data)
      _add(train_tar, f'{synset}.tar', inner.getvalue())

  val_names = [f'ILSVRC2012_val_{i + 1:08d}.JPEG' for i in range(num_val)]
  with tarfile.open(os.path.join(manual_dir, VAL_TAR), 'w') as val_tar:
    for i, (name, synset) in enumerate(zip(val_names, val_synsets)):
      mode, size = ODD_VAL_IMAGES.get(i, ('RGB', TYPICAL_SIZE))
      data = _encode(_image(synset, mode, size, rng))
      _add(val_tar, name, data[:200] if i == TRUNCATED_VAL_IMAGE else data)

  return FakeImageNet(
      manual_dir=manual_dir, train_synsets=sorted(images),
      num_train=sum(len(files) for files in images.values()),
      val_synsets=val_synsets,
      truncated=[truncated_train, val_names[TRUNCATED_VAL_IMAGE]],
      grey=[f'{odd_synset}_gray.JPEG'] + [
          val_names[i] for i, (mode, _) in ODD_VAL_IMAGES.items()
          if mode == 'L'])
