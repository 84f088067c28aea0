"""The embedded default: a narrow Darknet-53 on scikit-learn's digits.

Needs no download and trains, evaluates and checkpoints in a few minutes on
a 2-core CPU.
"""

from darknet53_jax import config_defaults


def get_config():
  config = config_defaults.get_config()
  config.dataset = 'sklearn_digits'
  config.eval_split = 'test'
  config.num_classes = 10
  config.shuffle_buffer = 2048
  config.train_size = 32
  config.eval_size = 32
  config.eval_crop_pct = 1.0
  config.crop_area_range = (0.8, 1.0)
  config.random_flip = False  # Mirrored digits are other symbols.
  config.color_jitter = 0.0
  config.model.width_multiplier = 0.25
  config.dtype = 'float32'
  config.batch_size = 64
  config.num_epochs = 10
  config.learning_rate = 0.05
  config.warmup_epochs = 1
  config.weight_decay = 5e-4
  config.checkpoint_every_epochs = 5
  config.max_checkpoints_to_keep = 3
  config.eval_every_epochs = 5
  config.log_every_steps = 20
  return config
