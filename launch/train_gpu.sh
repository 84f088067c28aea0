#!/usr/bin/env bash
# Trains Darknet-53 on ImageNet with every GPU of this host: one process,
# data-parallel over its GPUs (the reference's run_standalone_train_gpu.sh,
# and its 8-GPU run_distribute_train_gpu.sh on one 8-GPU host).
set -euo pipefail

usage() {
  cat >&2 <<USAGE
usage: $0 DATA_DIR [WORKDIR] [--config.KEY=VALUE ...]

  DATA_DIR  tensorflow-datasets data_dir holding a prepared imagenet2012.
  WORKDIR   checkpoints and TensorBoard events (default: runs/imagenet_gpu);
            rerunning with the same WORKDIR resumes.
  Further arguments go to darknet53_jax.main (--config.KEY=VALUE).

  Environment: CONFIG (default: configs/imagenet.py; the MindSpore
  reference's 8 x 256 run: configs/imagenet_reference.py), PYTHON (default:
  python; one with darknet53_jax installed, see the README),
  CUDA_VISIBLE_DEVICES.
USAGE
  exit 2
}

[[ $# -ge 1 && $1 != -* ]] || usage
data_dir=$1
shift
workdir=runs/imagenet_gpu
if [[ $# -ge 1 && $1 != -* ]]; then
  workdir=$1
  shift
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

exec "${PYTHON:-python}" -m darknet53_jax.main \
  --config="${repo}/${CONFIG:-configs/imagenet.py}" \
  --workdir="${workdir}" \
  --config.data_dir="${data_dir}" \
  "$@"
