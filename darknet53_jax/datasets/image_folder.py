"""A folder of images, a sub-folder per class, as a tensorflow-datasets builder.

```
ROOT/
  train/                      -> split 'train'
    CLASS_A/ xxx.jpg yyy.png ...
    CLASS_B/ ...
  val/ (or validation/)       -> split 'validation'
    CLASS_A/ ...
  test/                       -> split 'test' (any other folder: its own name)
```

Class names are the sorted union of the class folder names over all splits,
so label i is the i-th name in sorted order. The image files are copied,
byte for byte (no re-encoding), into a prepared tfds dataset under
``data_dir/image_folder/<folder name>_<path hash>/``: the input pipeline then
reads it like any tfds dataset (per-process sub-splits, fast sequential
reads). After preparation the prepared copy is authoritative: to pick up
changed files, delete that directory (or use another data_dir).
"""

import dataclasses
import hashlib
import os
import re

from etils import epath
import tensorflow_datasets as tfds

PREFIX = 'image_folder:'
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
SPLIT_ALIASES = {'val': 'validation'}


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  """The root folder of one image-folder dataset."""
  root_dir: str = ''


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """Images in ROOT/SPLIT/CLASS/ folders."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, root_dir: str, **kwargs):
    """A builder for the images under ``root_dir``.

    Args:
      root_dir: the folder holding one sub-folder per split.
      **kwargs: forwarded to ``tfds.core.GeneratorBasedBuilder`` (data_dir).
    """
    root_dir = os.path.abspath(os.path.expanduser(root_dir))
    super().__init__(
        config=ImageFolderConfig(name=config_name(root_dir), root_dir=root_dir),
        **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Once prepared, the class names come from the prepared copy's metadata.
    prepared = (epath.Path(self.data_dir) / 'dataset_info.json').exists()
    names = None if prepared else _class_names(self.builder_config.root_dir)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(),
            'label': tfds.features.ClassLabel(names=names),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        description=f'Images under {self.builder_config.root_dir}.',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The images are local.
    root = epath.Path(self.builder_config.root_dir)
    return {SPLIT_ALIASES.get(split.name, split.name): self._generate_examples(
        split) for split in _subfolders(root)}

  def _generate_examples(self, split_dir: epath.Path):
    for class_dir in _subfolders(split_dir):
      for path in sorted(class_dir.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
          key = f'{class_dir.name}/{path.name}'
          yield key, {'image': path.read_bytes(), 'label': class_dir.name,
                      'file_name': key}


def config_name(root_dir: str) -> str:
  """A tfds-safe name unique to the absolute path of ``root_dir``."""
  stem = re.sub(r'[^a-zA-Z0-9_]', '_', os.path.basename(root_dir)) or 'root'
  digest = hashlib.sha1(root_dir.encode()).hexdigest()[:8]
  return f'{stem}_{digest}'


def _subfolders(path: epath.Path) -> list[epath.Path]:
  return sorted((p for p in path.iterdir() if p.is_dir()),
                key=lambda p: p.name)


def _class_names(root_dir: str) -> list[str]:
  """Sorted class-folder names over every split folder of ``root_dir``."""
  root = epath.Path(root_dir)
  if not root.is_dir():
    raise FileNotFoundError(f'No image folder at {root_dir!r}.')
  names = {c.name for split in _subfolders(root) for c in _subfolders(split)}
  if not names:
    raise FileNotFoundError(
        f'{root_dir!r} has no SPLIT/CLASS/ sub-folders (e.g. train/cat/).')
  return sorted(names)
