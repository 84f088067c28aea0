"""Throughput benchmark on synthetic data (benchmarks/throughput.py).

The full Darknet-53 at the reference's 256 px train size with 1,000
classes, in bfloat16 (the GPU goal's precision). Images and labels are made
on the devices by ``darknet53_jax.synthetic_data``: no dataset, no
TensorFlow. Needs only ml_collections besides JAX (on a machine without it,
``benchmarks/gpu_check.sh`` installs its wheel).
"""

from darknet53_jax import config_defaults


def get_config():
  config = config_defaults.get_config()
  config.dataset = 'synthetic'
  config.num_classes = 1000
  config.train_size = 256
  config.eval_size = 256
  config.dtype = 'bfloat16'
  config.batch_size = 256
  # Steps timed per round; the benchmark reports the median of its rounds.
  config.benchmark_steps = 20
  config.benchmark_rounds = 3
  config.benchmark_warmup_steps = 3
  return config
