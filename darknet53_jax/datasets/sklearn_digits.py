"""scikit-learn's handwritten digits as a tensorflow-datasets builder.

1,797 real 8x8 grey-scale scans (UCI optdigits, shipped inside scikit-learn,
so nothing is downloaded), stored as PNG and split once, with a fixed seed,
into 1,437 train and 360 test images.
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 360
SPLIT_SEED = 0


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """Handwritten digits 0-9, 8x8 pixels, from scikit-learn."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(
                names=[str(d) for d in range(10)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships inside scikit-learn.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    # Pixel values are 0..16; spread them over 0..255.
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    test, train = order[:NUM_TEST], order[NUM_TEST:]
    return {
        'train': self._generate_examples(images, digits.target, train),
        'test': self._generate_examples(images, digits.target, test),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i])}
