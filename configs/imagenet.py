"""Darknet-53 on ImageNet-1k: our recommended recipe.

The reference's hyperparameters (150 epochs, SGD momentum 0.9, lr 0.1 per
256 images, weight decay 1e-4 on kernels, label smoothing 0.1 as e / (K - 1),
5 warm-up epochs then cosine to 0, 256 px training, eval resize 292 / centre
crop 256, float16) at global batch 256, with the choices the README's
"Reproducing the reference" table lists and explains: leaky ReLU, He-normal
kernels, BatchNorm synchronised over devices with Flax's momentum 0.9 and
biased running variance, a per-step cosine after warm-up, and a dynamic loss
scale that skips overflowing steps. configs/imagenet_reference.py is the
reference itself. On TPU pass --config.dtype=bfloat16.
"""

from darknet53_jax import config_defaults


def get_config():
  return config_defaults.get_config()
