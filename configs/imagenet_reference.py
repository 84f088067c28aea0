"""Darknet-53 on ImageNet-1k: the MindSpore reference's recipe and run.

research/cv/darknet53 of mindspore-ai/models, as its 8-GPU run trained it
(8 processes x 256 at lr 0.1): global batch 2048 at lr 0.1 unscaled, on any
number of devices that divides it. ReLU; XavierUniform convolution kernels and
a TruncatedNormal(0.01) classifier; BatchNorm momentum 0.1 of the old value,
running variance from the unbiased batch variance (cuDNN's); 5 warm-up epochs
then a cosine stepped once per epoch from epoch 0 over 150 epochs; float16
with a fixed loss scale of 1024 whose overflowing steps are applied, not
skipped. Everything else is the shared default, which is the reference's:
SGD momentum 0.9, weight decay 1e-4 on kernels, label smoothing 0.1 as
e / (K - 1), 256 px Inception crops, flips, colour jitter 0.4, eval resize
292 / centre crop 256.

BatchNorm statistics are per device (sync_batch_norm=False): 256 images each
on 8 devices, as the reference's; on other device counts they cover
2048 / devices images. What still differs (README, "Reproducing the
reference"): the input pipeline's decoders, resize kernels and random
streams; the initial weights' random values (their distributions match);
per-device running statistics, averaged over devices after each step here,
kept per process there; every validation image scored (the reference dropped
80); no best-training-loss checkpoint.
"""

from darknet53_jax import config_defaults


def get_config():
  config = config_defaults.get_config()
  config.batch_size = 2048
  config.lr_scaling = 'none'
  config.sync_batch_norm = False
  config.model.activation = 'relu'
  config.model.kernel_init = 'xavier_uniform'
  config.model.head_init = 'truncated_normal'
  config.model.bn_momentum = 0.1
  config.model.bn_unbiased_variance = True
  config.cosine_schedule = 'per_epoch_from_epoch0'
  config.loss_scale_mode = 'fixed'
  config.skip_nonfinite_updates = False
  return config
