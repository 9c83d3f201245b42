#!/usr/bin/env bash
# The whole system end to end on the embedded sample data: build the sample posters from
# Fashion-MNIST, preprocess them with Beam, train with the default embedded ImageNet backbone (EfficientNet-Lite0),
# evaluate, export a servable SavedModel, and predict on held-out posters.
# Outputs go to $TAGBEAM_DEMO_DIR (default ./work/demo); each step overwrites its own output.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh"
py="${TAGBEAM_VENV:-$root/.venv}/bin/python"
out="${TAGBEAM_DEMO_DIR:-$root/work/demo}"
cd "$root"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

step "1/5 embedded backbone (ImageNet EfficientNet-Lite0, built once into the cache)"
"$py" -m trainer.embedded_backbone build

step "2/5 sample data (real Fashion-MNIST mosaics as posters, real BigEarthNet chips)"
"$py" -m sample_data --output "$root/data/sample"

step "3/5 preprocess: manifest -> TFRecord shards (Beam, DirectRunner)"
"$py" -m pipelines.preprocess \
  --input "$root/data/sample/posters/MovieGenre.csv" \
  --output "$out/dataset" --overwrite

step "4/5 train, evaluate, export (MirroredStrategy, frozen backbone, cached features)"
"$py" -m trainer.task \
  --data_dir "$out/dataset" --model_dir "$out/model" --cpu_replicas 2

step "5/5 predict held-out posters with the exported SavedModel (Beam)"
"$py" -m pipelines.predict \
  --input "$root/data/sample/posters/MovieGenre-heldout.csv" \
  --model "$out/model/export" --output "$out/predictions" --overwrite

echo
echo "done in $(( $(date +%s) - start ))s: dataset $out/dataset, model $out/model, predictions $out/predictions"
echo "pages to open in a browser: $out/model/report.html, $out/predictions/summary.html"
