#!/usr/bin/env bash
# Trains Darknet-53 on ImageNet on a Cloud TPU VM slice: runs the same
# command on every worker (gcloud ... ssh --worker=all), in bfloat16. Each
# worker is one JAX process; JAX reads the workers from the TPU metadata.
set -euo pipefail

usage() {
  cat >&2 <<USAGE
usage: $0 TPU_NAME ZONE DATA_DIR WORKDIR [--config.KEY=VALUE ...]

  TPU_NAME  the TPU VM (e.g. a v4-32 slice: 4 workers).
  ZONE      its zone, e.g. us-central2-b.
  DATA_DIR  tensorflow-datasets data_dir with a prepared imagenet2012 that
            every worker reads, e.g. gs://BUCKET/tensorflow_datasets.
  WORKDIR   checkpoints and TensorBoard events, shared by every worker,
            e.g. gs://BUCKET/darknet53/run1; rerunning resumes.
  Further arguments go to darknet53_jax.main.

  Environment: CONFIG (relative to REPO_DIR, default: configs/imagenet.py;
  the MindSpore reference's 8 x 256 run: configs/imagenet_reference.py),
  REPO_DIR (the repository on the workers, default:
  darknet53_jax in the home directory), PYTHON (default: python3),
  PROJECT (the Google Cloud project, default: gcloud's).
USAGE
  exit 2
}

[[ $# -ge 4 ]] || usage
for arg in "$1" "$2" "$3" "$4"; do
  [[ ${arg} != -* ]] || usage
done
tpu_name=$1
zone=$2
data_dir=$3
workdir=$4
shift 4

command=$(printf '%q ' "${PYTHON:-python3}" -m darknet53_jax.main \
  --config="${CONFIG:-configs/imagenet.py}" \
  --workdir="${workdir}" \
  --config.data_dir="${data_dir}" \
  --config.dtype=bfloat16 \
  --distributed=on \
  "$@")
command=${command% }
project=()
if [[ -n ${PROJECT:-} ]]; then
  project=(--project="${PROJECT}")
fi
exec gcloud compute tpus tpu-vm ssh "${tpu_name}" --zone="${zone}" \
  ${project[@]+"${project[@]}"} --worker=all \
  --command="cd ${REPO_DIR:-darknet53_jax} && ${command}"
