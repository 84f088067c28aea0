#!/usr/bin/env bash
# Evaluates a checkpoint on the ImageNet validation set (all 50,000 images,
# each once) with every GPU of this host: the reference's run_eval_gpu.sh.
set -euo pipefail

usage() {
  cat >&2 <<USAGE
usage: $0 DATA_DIR CHECKPOINT [EVAL_DIR] [--config.KEY=VALUE ...]

  DATA_DIR    tensorflow-datasets data_dir holding a prepared imagenet2012.
  CHECKPOINT  a training workdir (its latest checkpoint), its checkpoints/
              folder or one step folder; written on any number of devices.
  EVAL_DIR    where the metrics go (default: eval).
  Further arguments go to darknet53_jax.main.

  Environment: CONFIG (default: configs/imagenet.py: the config the
  checkpoint was trained with), PYTHON (default: python; one with
  darknet53_jax installed, see the README), CUDA_VISIBLE_DEVICES.
USAGE
  exit 2
}

[[ $# -ge 2 && $1 != -* && $2 != -* ]] || usage
data_dir=$1
checkpoint=$2
shift 2
eval_dir=eval
if [[ $# -ge 1 && $1 != -* ]]; then
  eval_dir=$1
  shift
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

exec "${PYTHON:-python}" -m darknet53_jax.main \
  --config="${repo}/${CONFIG:-configs/imagenet.py}" \
  --workdir="${eval_dir}" \
  --config.data_dir="${data_dir}" \
  --eval_only \
  --checkpoint="${checkpoint}" \
  "$@"
