"""Defaults shared by every recipe: the MindSpore reference's ImageNet recipe.

Each field is documented in the README's configuration table.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data.
  config.dataset = 'imagenet2012'
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.train_split = 'train'
  config.eval_split = 'validation'
  # More eval sets, NAME: (dataset, split), logged as eval_NAME/* beside
  # eval/*, e.g. config.eval_sets.v2 = ('imagenet_v2/matched-frequency',
  # 'test').
  config.eval_sets = ml_collections.ConfigDict()
  config.num_classes = 0  # 0: the dataset's class count (1000 for ImageNet).
  config.shuffle_buffer = 16_384
  config.train_size = 256
  config.crop_area_range = (0.08, 1.0)
  config.aspect_ratio_range = (3 / 4, 4 / 3)
  config.random_flip = True
  config.color_jitter = 0.4
  # Eval: resize the shorter side to floor(eval_size / eval_crop_pct), then
  # centre-crop eval_size. The reference: resize 292, crop 256.
  config.eval_size = 256
  config.eval_crop_pct = 256 / 292
  config.interpolation = 'bilinear'
  config.mean_rgb = (0.485, 0.456, 0.406)
  config.std_rgb = (0.229, 0.224, 0.225)

  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.activation = 'leaky_relu'
  config.model.negative_slope = 0.1
  config.model.width_multiplier = 1.0
  config.model.stage_depths = (1, 2, 8, 8, 4)
  config.model.bn_momentum = 0.9
  config.model.bn_epsilon = 1e-5
  # CPU convolutions (faster there). None: on when JAX runs on CPUs, off on
  # GPUs and TPUs. False: XLA's convolutions everywhere, for jax.jvp and
  # for CPU results independent of the number of devices per process (see
  # Darknet53.cpu_matmul_convs).
  config.model.cpu_matmul_convs = ml_collections.config_dict.placeholder(bool)
  config.sync_batch_norm = True

  # Precision: float16 with dynamic loss scaling (GPU), bfloat16 (TPU) or
  # float32. Parameters and BatchNorm statistics are always float32.
  config.dtype = 'float16'
  config.loss_scale = 1024.0
  config.loss_scale_growth_interval = 2000

  # Optimisation. batch_size is global (over all devices and processes).
  config.batch_size = 256
  config.num_epochs = 150
  config.learning_rate = 0.1
  config.lr_scaling = 'linear'  # peak = learning_rate * batch_size / 256.
  config.warmup_epochs = 5
  config.eta_min = 0.0
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.label_smoothing = 0.1
  # float32/bfloat16: stop after this many consecutive non-finite steps
  # (each is skipped without changing the state).
  config.max_consecutive_nonfinite_steps = 20

  # Checkpoints, evaluation and logging.
  config.checkpoint_every_epochs = 5
  config.max_checkpoints_to_keep = 90
  config.eval_every_epochs = 5
  config.log_every_steps = 100
  config.profile_steps = 0  # > 0: capture a profile of that many steps.
  config.init_from = ''  # A checkpoint to start a new run from.
  config.seed = 0

  # Fine-tuning (docs/reuse.md). freeze_backbone: a linear probe, only the
  # head trains and the backbone's BatchNorm runs in eval mode on its
  # running statistics. Otherwise the backbone learns at
  # backbone_lr_multiplier times the head's rate.
  config.freeze_backbone = False
  config.backbone_lr_multiplier = 1.0

  # Runtime. Compiled steps are kept here and reused by the next start,
  # resume or --eval_only with the same shapes; None: $JAX_COMPILATION_CACHE_DIR
  # or ~/.cache/darknet53_jax/xla/<cpu>; '': no cache.
  config.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
  # XLA:GPU's deterministic ops: bitwise-repeatable GPU runs, at a cost in
  # speed (README); no effect on CPUs and TPUs.
  config.deterministic = False
  return config
