"""Defaults shared by every recipe: our recommended ImageNet recipe
(configs/imagenet.py). configs/imagenet_reference.py changes them to the
MindSpore reference's.

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
  # The eval resize's interpolation; None: config.interpolation (the train
  # crops'). timm evaluates darknet53.c2ns_in1k at eval_size=288,
  # eval_crop_pct=1.0, eval_interpolation='bicubic'.
  config.eval_interpolation = ml_collections.config_dict.placeholder(str)
  config.mean_rgb = (0.485, 0.456, 0.406)
  # RandAugment in timm's notation, e.g. 'rand-m9-mstd0.5-inc1' (docs/data.md);
  # '': off.
  config.rand_augment = ''
  # Random erasing: the probability that a train image gets an erased
  # rectangle (timm's re_prob); 0: off. Its colours (timm's re_mode):
  # 'pixel' (noise per pixel), 'rand' (one random colour) or 'const' (the
  # mean colour).
  config.random_erasing = 0.0
  config.random_erasing_mode = 'pixel'
  # Mixup and CutMix on the devices (timm's names): an alpha of 0 turns
  # either off; mix_prob is the chance a batch is mixed at all, and
  # mix_switch_prob the chance that CutMix replaces Mixup when both are on.
  config.mixup_alpha = 0.0
  config.cutmix_alpha = 0.0
  config.mix_prob = 1.0
  config.mix_switch_prob = 0.5
  config.std_rgb = (0.229, 0.224, 0.225)

  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.activation = 'leaky_relu'
  config.model.negative_slope = 0.1
  config.model.width_multiplier = 1.0
  config.model.stage_depths = (1, 2, 8, 8, 4)
  # Convolution kernels: 'he_normal' or 'xavier_uniform' (Glorot's uniform,
  # the reference's XavierUniform). Classifier kernel: 'lecun_normal' (Flax's
  # Dense default) or 'truncated_normal' (the reference's TruncatedNormal():
  # std 0.01 cut at 2 std). Biases start at 0, BatchNorm at scale 1, bias 0.
  config.model.kernel_init = 'he_normal'
  config.model.head_init = 'lecun_normal'
  # BatchNorm: weight of the old running statistic (the convention of Flax
  # and MindSpore, whose momentum=0.1 is 0.1 here; PyTorch's m is 1 - m).
  config.model.bn_momentum = 0.9
  config.model.bn_epsilon = 1e-5
  # True: the running variance takes the unbiased batch variance (n / (n - 1)
  # times the biased one that normalises), as PyTorch and cuDNN (the
  # reference's GPU BatchNorm) do; False: the biased one, as Flax does.
  config.model.bn_unbiased_variance = False
  # CPU convolutions (faster there). None: on when JAX runs on CPUs, off on
  # GPUs and TPUs. False: XLA's convolutions everywhere, for jax.jvp and
  # for CPU results independent of the number of devices per process (see
  # Darknet53.cpu_matmul_convs).
  config.model.cpu_matmul_convs = ml_collections.config_dict.placeholder(bool)
  config.sync_batch_norm = True

  # Precision: float16 with loss scaling (GPU), bfloat16 (TPU) or float32.
  # Parameters and BatchNorm statistics are always float32.
  config.dtype = 'float16'
  # float16 only: 'dynamic' starts at loss_scale, halves on a non-finite step
  # and doubles after loss_scale_growth_interval finite ones; 'fixed' keeps
  # loss_scale (the reference's FixedLossScaleManager).
  config.loss_scale_mode = 'dynamic'
  config.loss_scale = 1024.0
  config.loss_scale_growth_interval = 2000
  # True: a step with a non-finite loss or gradient changes nothing but the
  # step and loss scale. False: it is applied as it is, non-finite values
  # and all (the reference's drop_overflow_update=False); float16 then needs
  # loss_scale_mode='fixed'.
  config.skip_nonfinite_updates = True

  # Optimisation. batch_size is global (over all devices and processes), per
  # update: with accumulation_steps > 1, each device runs its share of the
  # batch as that many micro-batches and applies one update.
  config.batch_size = 256
  config.accumulation_steps = 1
  # 'sgd' (momentum, nesterov), 'adamw', 'lamb' or 'lars'.
  config.optimizer = 'sgd'
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.lars_trust_coefficient = 0.001
  config.num_epochs = 150
  config.learning_rate = 0.1
  config.lr_scaling = 'linear'  # peak = learning_rate * batch_size / 256.
  config.warmup_epochs = 5
  config.eta_min = 0.0
  # The cosine after warm-up: 'per_step_after_warmup' (from the peak at the
  # end of warm-up, every step) or 'per_epoch_from_epoch0' (the reference's:
  # cos(pi * epoch / num_epochs), constant within an epoch).
  config.cosine_schedule = 'per_step_after_warmup'
  # After warm-up: 'cosine' (above), 'step' (times lr_step_decay at each of
  # lr_step_epochs) or 'poly' ((1 - progress) ** lr_poly_power, Darknet's).
  config.lr_schedule = 'cosine'
  config.lr_step_epochs = (30, 60, 90)
  config.lr_step_decay = 0.1
  config.lr_poly_power = 4.0
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.label_smoothing = 0.1
  # Stop after this many consecutive non-finite steps, except in float16
  # with a dynamic loss scale and skipped updates (it recovers from them).
  config.max_consecutive_nonfinite_steps = 20

  # Exponential moving average of the params and BatchNorm statistics,
  # evaluated beside them as eval_ema/*; 0: off. ema_warmup: the decay
  # starts low and approaches ema_decay as (1 + step) / (10 + step).
  config.ema_decay = 0.0
  config.ema_warmup = False

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
