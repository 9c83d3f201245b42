"""What `trainer.task` hands to everyone else: the model directory and the serving SavedModel.

`pipelines.predict` and `pipelines.retrain` read exports through these names; trainer/serving.py
writes them. An export is TF Serving's layout: `<model_dir>/export/<version>/` with
`saved_model.pb`, `variables/` and `assets/`.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from tagbeam import dataset, storage

# --- the model directory (--model_dir) ------------------------------------------------------------
EXPORT_DIR = "export"
RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
THRESHOLDS_JSON = "thresholds.json"
LABELS_TXT = dataset.LABELS_TXT
STORED_IMAGES_JSON = "stored_images.json"  # export asset: dataset.StoredImages
BACKBONE_JSON = "backbone.json"  # export asset: run.json's "backbone" (name, handle, tagbeam_backbone.json)
# The model report (trainer/report.py; README "Reports") and what it is built from, so that
# `python -m trainer.report` rebuilds it without the dataset. docs/report.md describes the files.
REPORT_HTML = "report.html"
EVALUATION_DIR = "evaluation"
TEST_SCORES_NPZ = "evaluation/test_scores.npz"  # ids [n] str, labels [n,K] uint8, scores [n,K] float32
THUMBNAILS_DIR = "evaluation/thumbnails"  # <row>.jpg: gallery images, row = index in test_scores.npz
CAMS_DIR = "evaluation/cams"  # <row>-<label index>.png: class activation maps over those thumbnails
REPORT_CONTEXT_JSON = "evaluation/context.json"  # dataset summary, stop reason, why there are no maps
CHECKPOINTS_DIR = "checkpoints"
BACKUP_DIR = "backup"
LOGS_DIR = "logs"
FEATURE_CACHE_DIR = "feature_cache"

# --- the SavedModel -------------------------------------------------------------------------------
SIGNATURE_NAME = "serving_default"
INPUT_NAME = "image_bytes"  # a batch of encoded images; "_bytes" marks binary input for Vertex AI / AI Platform
# Formats serving_default decodes (TensorFlow's decoders); others (TIFF, ...) are refused by name.
SERVING_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WebP")
# A second signature, for batch prediction: images already as the dataset stores them (made from
# any source format by the pipeline's own code, pipelines/images.py), decoded exactly as training
# decodes them. Same input name and outputs.
STORED_SIGNATURE_NAME = "stored_images"
OUTPUT_PROBABILITIES = "probabilities"  # float32 [B, K]
OUTPUT_PREDICTED_LABELS = "predicted_labels"  # string [B, K]: the label where its threshold is reached, else ""
OUTPUT_PREDICTED = "predicted"  # int32 [B, K]: 0/1
ASSETS_DIR = "assets"
SAVED_MODEL_PB = "saved_model.pb"

# --- backbones (TF Hub image feature vectors) --------------------------------------------------------
# An optional second function of a backbone SavedModel: the feature map before global average
# pooling, `spatial_features(images) -> [B, h, w, C]` for float RGB images in [0, 1], whose spatial
# mean is what `__call__(images, training=False)` returns. The embedded backbones export it; the
# model report's class activation maps use it (a backbone without it gets no maps, and says so).
BACKBONE_SPATIAL_FUNCTION = "spatial_features"


def asset_path(export_dir: str, name: str) -> str:
    return storage.join(export_dir, ASSETS_DIR, name)


def thresholds_json(labels: Sequence[str], thresholds: Sequence[float]) -> str:
    """thresholds.json: ``{"thresholds": {label: threshold, ...}}`` in label order."""
    if len(labels) != len(thresholds):
        raise ValueError(f"{len(labels)} labels but {len(thresholds)} thresholds.")
    return json.dumps({"thresholds": {str(k): float(t) for k, t in zip(labels, thresholds, strict=True)}}, indent=2) + "\n"


def parse_thresholds_json(text: str) -> tuple[list[str], list[float]]:
    mapping = json.loads(text)["thresholds"]
    return list(mapping), [float(v) for v in mapping.values()]


_EXPORT_AGAIN = "export the model again with `python -m trainer.task`"


def read_labels(export_dir: str) -> list[str]:
    path = asset_path(export_dir, LABELS_TXT)
    try:
        labels = dataset.read_labels(path)
    except UnicodeDecodeError as err:
        raise storage.BadFile(f"{path} is not UTF-8 text ({err}): {_EXPORT_AGAIN}") from None
    if not labels:
        raise storage.BadFile(f"{path} lists no label: {_EXPORT_AGAIN}")
    return labels


def read_thresholds(export_dir: str) -> tuple[list[str], list[float]]:
    path = asset_path(export_dir, THRESHOLDS_JSON)
    try:
        return parse_thresholds_json(storage.read_text(path))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise storage.BadFile(f"{path} is not a thresholds file ({type(err).__name__}: {err}): "
                              f"{_EXPORT_AGAIN}") from None


def read_stored_images(export_dir: str) -> dataset.StoredImages | None:
    """How the model's training images were stored; None for exports written before it was recorded."""
    meta = storage.read_json_if_exists(asset_path(export_dir, STORED_IMAGES_JSON))
    return dataset.StoredImages.from_json(meta) if meta else None


def read_backbone(export_dir: str) -> dict[str, Any]:
    """Which backbone the model stands on; {} for exports written before it was recorded."""
    return storage.read_json_if_exists(asset_path(export_dir, BACKBONE_JSON)) or {}


def newest_version(export_base: str) -> str | None:
    """The numeric version folder with the highest number under `export_base`, or None."""
    versions = []
    for path in storage.match(storage.join(export_base, "*", SAVED_MODEL_PB)):
        folder = path[: -len(SAVED_MODEL_PB)].rstrip("/")
        name = folder.rsplit("/", 1)[-1]
        if name.isdigit():
            versions.append((int(name), folder))
    return max(versions)[1] if versions else None


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """run.json: what a finished `trainer.task` run did. Written last, after the export."""

    flags: Mapping[str, Any]  # every option of the run, as parsed
    export_path: str
    dataset_json: str = ""
    backbone: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    training_path: str = ""
    num_replicas_in_sync: int = 1
    devices: Sequence[str] = ()
    initial_epoch: int = 0
    epochs_completed: int = 0
    thresholds_tuned_on: str = "val"
    val_macro_f1_tuned: float | None = None
    test_macro_f1_tuned: float | None = None
    timings: Mapping[str, float] = dataclasses.field(default_factory=dict)
    tensorflow: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "devices": list(self.devices)}

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> RunInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in known})


def read_run_info(model_dir: str) -> RunInfo | None:
    """The run.json of `model_dir`, or None when no run finished there."""
    meta = storage.read_state_json(storage.join(model_dir, RUN_JSON),
                                   "trainer.task writes it last; train that model again")
    return RunInfo.from_json(meta) if meta and meta.get("export_path") else None
