"""tensorflow-datasets builders shipped with the project (registered on import)."""

from darknet53_jax.datasets import image_folder  # noqa: F401
from darknet53_jax.datasets import sklearn_digits  # noqa: F401
