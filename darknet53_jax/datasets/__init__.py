"""tensorflow-datasets builders shipped with the project (registered on
import), and the registry of datasets a run can use (``registry``)."""

from absl import logging
import tensorflow as tf

# tf.data runs on the host. A GPU build of TensorFlow would otherwise reserve
# most of each GPU's memory at its first op, before JAX allocates; every
# TensorFlow user here imports this package first.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TensorFlow ran an op before this import: too late.
  logging.warning('TensorFlow was initialised before darknet53_jax: it may '
                  'hold GPU memory that JAX needs.')

from darknet53_jax.datasets import image_folder  # noqa: E402,F401
from darknet53_jax.datasets import sklearn_digits  # noqa: E402,F401
