#!/usr/bin/env bash
# Launches the project's Beam jobs on Dataflow from a machine with the project installed
# (`pip install .`) and gcloud application-default credentials:
#
#   PROJECT=my-project REGION=us-central1 BUCKET=my-bucket \
#     deploy/dataflow/launch.sh preprocess --input gs://my-bucket/MovieGenre.csv --format movie_genre \
#       --output gs://my-bucket/tagbeam/datasets/v1
#   PROJECT=... REGION=... BUCKET=... \
#     deploy/dataflow/launch.sh predict --input gs://my-bucket/new.csv --format movie_genre \
#       --model gs://my-bucket/tagbeam/model/export --output gs://my-bucket/tagbeam/predictions/today
#
# Arguments after the job name go to the job (its own flags, then any Beam/Dataflow option, e.g.
# --max_num_workers=50 or --dataflow_service_options=...). Environment:
#   PROJECT, REGION, BUCKET  required: GCP project, Dataflow region, bucket for temp/staging files
#   WORKER_IMAGE             optional: a worker image built from deploy/dataflow.Dockerfile; without it
#                            workers pip-install the project from ./setup.py at start-up (slower)
#   MACHINE_TYPE             worker machine type (default n1-standard-4)
#   PYTHON                   interpreter with the project installed (default: python)
set -euo pipefail
usage() { echo "usage: $0 {preprocess|predict} [job flags...] (see the header of $0)" >&2; exit 2; }
[ $# -ge 1 ] || usage
job="$1"; shift
: "${PROJECT:?set PROJECT to the GCP project id}"
: "${REGION:?set REGION to the Dataflow region, e.g. us-central1}"
: "${BUCKET:?set BUCKET to a bucket name (no gs://) for Dataflow temp and staging files}"

# --setup_file is resolved from the repository root, where setup.py lives.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
py="${PYTHON:-python}"

dataflow=(
  --runner=DataflowRunner
  --project="$PROJECT"
  --region="$REGION"
  --temp_location="gs://$BUCKET/tagbeam/dataflow/tmp"
  --staging_location="gs://$BUCKET/tagbeam/dataflow/staging"
  --job_name="tagbeam-$job-$(date -u +%Y%m%d-%H%M%S)"
  --machine_type="${MACHINE_TYPE:-n1-standard-4}"
)
if [ -n "${WORKER_IMAGE:-}" ]; then
  dataflow+=(--sdk_container_image="$WORKER_IMAGE")
else
  dataflow+=(--setup_file=./setup.py)
fi

case "$job" in
  preprocess) exec "$py" -m pipelines.preprocess "${dataflow[@]}" "$@" ;;
  predict) exec "$py" -m pipelines.predict "${dataflow[@]}" "$@" ;;
  *) usage ;;
esac
