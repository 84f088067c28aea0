"""Darknet-53 on ImageNet-1k: the MindSpore reference's recipe one to one.

150 epochs, global batch 256, SGD momentum 0.9, lr 0.1, weight decay 1e-4 on
kernels, label smoothing 0.1, 5 warm-up epochs then cosine to 0, 256 px
training, eval resize 292 / centre crop 256, float16 with loss scaling from
1024. On TPU pass --config.dtype=bfloat16. To reproduce the reference's
8-GPU run (8 x 256 at lr 0.1, unscaled): --config.batch_size=2048
--config.lr_scaling=none.
"""

from darknet53_jax import config_defaults


def get_config():
  return config_defaults.get_config()
