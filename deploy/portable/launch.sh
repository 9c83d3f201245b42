#!/usr/bin/env bash
# Launches the project's Beam jobs on a Flink or Spark cluster through its Beam job server
# (deploy/README.md, section 2b), from a machine with the project installed (`pip install .`):
#
#   JOB_ENDPOINT=jobserver.internal:8099 TEMP_LOCATION=gs://my-bucket/tagbeam/tmp \
#     deploy/portable/launch.sh preprocess --input gs://my-bucket/MovieGenre.csv --format movie_genre \
#       --output gs://my-bucket/tagbeam/datasets/v1
#   JOB_ENDPOINT=... TEMP_LOCATION=... WORKER_IMAGE=registry.internal/tagbeam/worker:abc123 \
#     deploy/portable/launch.sh predict --input gs://my-bucket/new.csv --format movie_genre \
#       --model gs://my-bucket/tagbeam/model/export --output gs://my-bucket/tagbeam/predictions/today
#
# Arguments after the job name go to the job (its own flags, then any Beam option, e.g.
# --sdk_worker_parallelism=2). Environment:
#   JOB_ENDPOINT        required: the Flink or Spark job server, host:port (its --job-port, 8099 by default)
#   TEMP_LOCATION       required: a folder every worker can write (gs://, hdfs://, s3://), for Beam's and
#                       the vocabulary analysis' temporary files
#   ENVIRONMENT_TYPE    how the cluster runs the Python SDK workers: DOCKER (default), PROCESS or EXTERNAL
#   ENVIRONMENT_CONFIG  DOCKER: the SDK image (default: WORKER_IMAGE, else apache/beam_python3.11_sdk:2.77.0);
#                       PROCESS: {"command": "/opt/apache/beam/boot"}; EXTERNAL: the worker pool, host:50000
#   WORKER_IMAGE        an image built from deploy/dataflow.Dockerfile (the project preinstalled); without it
#                       (and with PROCESS) the workers pip-install the project from ./setup.py at start-up
#   PYTHON              interpreter with the project installed (default: python)
set -euo pipefail
usage() { echo "usage: $0 {preprocess|predict} [job flags...] (see the header of $0)" >&2; exit 2; }
[ $# -ge 1 ] || usage
job="$1"; shift
: "${JOB_ENDPOINT:?set JOB_ENDPOINT to the job server, host:8099}"
: "${TEMP_LOCATION:?set TEMP_LOCATION to a folder every worker can write, e.g. gs://bucket/tagbeam/tmp}"

# --setup_file is resolved from the repository root, where setup.py lives.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
py="${PYTHON:-python}"
environment_type="${ENVIRONMENT_TYPE:-DOCKER}"

portable=(
  --runner=PortableRunner
  --job_endpoint="$JOB_ENDPOINT"
  --temp_location="$TEMP_LOCATION"
  --job_name="tagbeam-$job-$(date -u +%Y%m%d-%H%M%S)"
  --environment_type="$environment_type"
)
if [ "$environment_type" = DOCKER ]; then
  portable+=(--environment_config="${ENVIRONMENT_CONFIG:-${WORKER_IMAGE:-apache/beam_python3.11_sdk:2.77.0}}")
elif [ -n "${ENVIRONMENT_CONFIG:-}" ]; then
  portable+=(--environment_config="$ENVIRONMENT_CONFIG")
fi
if [ -z "${WORKER_IMAGE:-}" ] && [ "$environment_type" != EXTERNAL ]; then
  portable+=(--setup_file=./setup.py)  # staged through the job server's artifact service
fi

case "$job" in
  preprocess) exec "$py" -m pipelines.preprocess "${portable[@]}" "$@" ;;
  predict) exec "$py" -m pipelines.predict "${portable[@]}" "$@" ;;
  *) usage ;;
esac
