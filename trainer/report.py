"""The model report: `report.html` in every model folder, `python -m trainer.report --model_dir M` rebuilds it.

`trainer.task` keeps what the page needs under `<model_dir>/evaluation/` (tagbeam/export.py names the
files, docs/report.md describes them): every test example's scores and labels, thumbnails of the
gallery's images and their class activation maps. The page is then built from the model folder
alone (metrics.json, thresholds.json, history.json, run.json and those files), so it can be rebuilt
after the dataset is gone. `pipelines.predict` renders the same evaluation section for labelled
manifests through `evaluation_section`.

Bounded size: the page holds every positive's score, at most MAX_NEGATIVE_SCORES negatives' scores
per label (the highest: the curve and the threshold control are exact above the highest one left
out, and say so below it), a gallery for at most MAX_GALLERY_LABELS labels (the weakest when there
are more) and a confusion table up to CONFUSION_TABLE_LABELS labels (benchmarks/report_size.py).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tagbeam import export as model_files
from tagbeam import flags, pages, storage

log = logging.getLogger("trainer.report")

MAX_NEGATIVE_SCORES = 1000
MAX_GALLERY_LABELS = 60
GALLERY_FALSE_POSITIVES = 4
GALLERY_MISSED = 4
GALLERY_CORRECT = 2
CONFUSION_TABLE_LABELS = 30
CONFUSIONS_LISTED = 8  # per label, in its section
THUMBNAIL_PX = 128


# --- the evaluation data kept in the model folder ---------------------------------------------------

@dataclasses.dataclass
class Scored:
    """Test examples as evaluated: ids [n], multi-hot labels [n,K] (bool) and scores [n,K] (float32)."""

    ids: np.ndarray
    truth: np.ndarray
    scores: np.ndarray

    def to_npz(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, ids=self.ids.astype(str), labels=self.truth.astype(np.uint8),
                            scores=self.scores.astype(np.float32))
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, body: bytes) -> Scored:
        with np.load(io.BytesIO(body), allow_pickle=False) as arrays:
            return cls(arrays["ids"], arrays["labels"] > 0, arrays["scores"].astype(np.float32))


def gallery_rows(scored: Scored, thresholds: np.ndarray) -> dict[int, dict[str, list[int]]]:
    """Per shown label: the most confident false positives, the least confident missed positives and
    the most confident correct ones (rows of `scored`), at `thresholds`."""
    scores, truth = scored.scores, scored.truth
    predicted = scores >= thresholds
    shown = _gallery_labels(scored, thresholds)
    rows: dict[int, dict[str, list[int]]] = {}
    for k in shown:
        order = np.argsort(-scores[:, k], kind="stable")
        hit, positive = predicted[order, k], truth[order, k]
        rows[int(k)] = {"fp": order[hit & ~positive][:GALLERY_FALSE_POSITIVES].tolist(),
                        "fn": order[::-1][(positive & ~hit)[::-1]][:GALLERY_MISSED].tolist(),
                        "tp": order[hit & positive][:GALLERY_CORRECT].tolist()}
    return rows


def _gallery_labels(scored: Scored, thresholds: np.ndarray) -> list[int]:
    count = scored.scores.shape[1]
    if count <= MAX_GALLERY_LABELS:
        return list(range(count))
    predicted = scored.scores >= thresholds
    tp = np.sum(predicted & scored.truth, axis=0)
    errors = np.sum(predicted != scored.truth, axis=0)  # fp + fn
    f1 = np.divide(2 * tp, 2 * tp + errors, out=np.zeros(count), where=2 * tp + errors > 0)  # evaluation.py's F1
    return sorted(int(k) for k in np.argsort(f1, kind="stable")[:MAX_GALLERY_LABELS])


def thumbnail_jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    picture = Image.fromarray(np.asarray(image, np.uint8))
    picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=85)
    return out.getvalue()


def cam_png(cam: np.ndarray, size: int) -> bytes:
    """A map [h,w] as a red overlay (alpha grows with the positive evidence), `size` px square."""
    from PIL import Image

    positive = np.maximum(cam, 0.0)
    top = float(positive.max())
    alpha = (255 * positive / top).astype(np.uint8) if top > 0 else np.zeros(cam.shape, np.uint8)
    rgba = np.zeros(cam.shape + (4,), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 3] = 255, 40, alpha
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").resize((size, size), Image.BILINEAR).save(out, "PNG")
    return out.getvalue()


# --- class activation maps ----------------------------------------------------------------------

def cam_unavailable(backbone: Any, hidden_units: int) -> str | None:
    """Why this model gets no class activation maps, or None when it does."""
    if hidden_units > 0:
        return (f"No class activation maps: the head has a hidden layer (--hidden_units {hidden_units}), so the label's "
                "score is not a weighted sum of the backbone's spatial features; maps are exact only for the default linear head.")
    if not hasattr(backbone.loaded, model_files.BACKBONE_SPATIAL_FUNCTION):
        return (f"No class activation maps: the backbone {backbone.handle} exposes no "
                f"`{model_files.BACKBONE_SPATIAL_FUNCTION}` function (its feature map before pooling), which the maps "
                "need; most TF Hub feature vectors have none.")
    return None


def class_activation_maps(backbone: Any, head: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maps [n,h,w,K], bias [K]) of the linear head over the backbone's spatial features: the map's
    spatial mean plus the bias is the label's logit, since the features are the maps' spatial mean."""
    import tensorflow as tf

    layer = head.get_layer("logits")
    kernel, bias = (np.asarray(v, np.float32) for v in layer.get_weights())
    spatial = getattr(backbone.loaded, model_files.BACKBONE_SPATIAL_FUNCTION)(
        tf.image.convert_image_dtype(tf.constant(images), tf.float32))
    return np.einsum("bhwc,ck->bhwk", np.asarray(spatial, np.float32), kernel), bias


# --- the page's evaluation section (also the predict summary's) -------------------------------------

def evaluation_section(scored: Scored, labels: Sequence[str], thresholds: np.ndarray, metrics: Mapping[str, Any],
                       images: Mapping[int, bytes], cams: Mapping[tuple[int, int], bytes], cam_note: str | None,
                       gallery_note: str | None = None) -> dict[str, Any]:
    """JSON for report.js's evaluation section. `images`: row -> thumbnail JPEG; `cams`: (row, label) -> PNG."""
    thresholds = np.asarray(thresholds, np.float32)
    scores, truth = scored.scores.astype(np.float32), scored.truth.astype(bool)
    predicted = scores >= thresholds
    false_pos = predicted & ~truth
    # float32 BLAS: sums of 0/1 products are exact integers below 2**24 rows, and 100x faster than int64.
    confusion = np.rint(false_pos.T.astype(np.float32) @ truth.astype(np.float32)).astype(np.int64)
    with_no_label = (false_pos & ~truth.any(axis=1, keepdims=True)).sum(axis=0)
    table = len(labels) <= CONFUSION_TABLE_LABELS
    per_label, rows_listed = [], []
    for k, name in enumerate(labels):
        column, positive = scores[:, k], truth[:, k]
        pos = np.sort(column[positive])[::-1]
        neg = np.sort(column[~positive])[::-1]
        floor = float(neg[MAX_NEGATIVE_SCORES]) if len(neg) > MAX_NEGATIVE_SCORES else None
        order = np.argsort(-confusion[k], kind="stable")
        nonzero = [[int(j), int(confusion[k, j])] for j in order if confusion[k, j] > 0]
        rows_listed.append(nonzero if table else nonzero[:CONFUSIONS_LISTED])
        m = metrics["per_label"][name]
        per_label.append({
            "support": int(positive.sum()), "ap": m["average_precision"], "negatives": int(len(neg)),
            "pos": pages.float32_base64(pos), "neg": pages.float32_base64(neg[:MAX_NEGATIVE_SCORES]), "neg_floor": floor,
            "at_tuned": m["at_tuned"], "at_default": m["at_default"],
            "confused": rows_listed[-1][:CONFUSIONS_LISTED],
        })
    gallery: dict[str, Any] = {"items": {}}
    selected = gallery_rows(scored, thresholds)
    if len(selected) < len(labels):
        gallery["labels_note"] = (f"The gallery covers the {len(selected)} labels with the lowest F1 at their tuned "
                                  f"thresholds (of {len(labels)}), to keep the page small.")
    for k, groups in selected.items():
        gallery["items"][str(k)] = {kind: [{
            "row": r, "id": str(scored.ids[r]), "score": float(scores[r, k]),
            "true": np.flatnonzero(truth[r]).tolist(), "pred": np.flatnonzero(predicted[r]).tolist(),
            "thumb": pages.data_uri("image/jpeg", images[r]) if r in images else None,
            "cam": pages.data_uri("image/png", cams[(r, k)]) if (r, k) in cams else None,
        } for r in rows] for kind, rows in groups.items()}
    return {
        "labels": list(labels), "thresholds": [float(t) for t in thresholds], "examples": int(len(scores)),
        "default_threshold": metrics["default_threshold"], "per_label": per_label,
        "confusion": {"table": table, "rows": rows_listed, "none": with_no_label.tolist()},
        "gallery": gallery, "cam_note": cam_note, "gallery_note": gallery_note,
    }


# --- writing what the page needs at the end of training ----------------------------------------------

def save_evaluation(model_dir: str, info: Any, probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray,
                    cam_note: str | None, cam_maker: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None) -> None:
    """Writes evaluation/: the test split's ids, labels and scores, the gallery's thumbnails and maps.

    Reads the test split once, in the stored order the scores follow (trainer.data.split_records),
    decoding only the gallery's images."""
    import tensorflow as tf

    from tagbeam.dataset import FEATURE_ID, FEATURE_IMAGE, FEATURE_LABELS
    from trainer import data

    spec = {FEATURE_ID: tf.io.FixedLenFeature([], tf.string), FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string),
            FEATURE_LABELS: tf.io.FixedLenFeature([info.num_labels], tf.int64)}
    thresholds = np.asarray(thresholds, np.float32)
    probs = np.asarray(probs, np.float32)
    ids, stored_truth, images = [], [], {}
    wanted = {r for groups in gallery_rows(Scored(np.arange(len(probs)).astype(str), truth > 0, probs), thresholds).values()
              for rows in groups.values() for r in rows}
    for row, record in enumerate(data.split_records(info, "test")):
        example = tf.io.parse_single_example(record, spec)
        ids.append(example[FEATURE_ID].numpy().decode("utf-8", "replace"))
        stored_truth.append(example[FEATURE_LABELS].numpy())
        if row in wanted:
            images[row] = info.stored_images.decode(example[FEATURE_IMAGE]).numpy()
    if len(ids) != len(probs) or not np.array_equal(np.asarray(stored_truth) > 0, np.asarray(truth) > 0):
        raise ValueError(f"the test split read back ({len(ids)} examples) does not match the {len(probs)} evaluated ones")
    scored = Scored(np.asarray(ids), np.asarray(truth) > 0, probs)
    storage.write_bytes(storage.join(model_dir, model_files.TEST_SCORES_NPZ), scored.to_npz())
    for row, image in images.items():
        storage.write_bytes(storage.join(model_dir, model_files.THUMBNAILS_DIR, f"{row}.jpg"), thumbnail_jpeg(image))
    if cam_maker is not None and images:
        rows = sorted(images)
        try:
            maps, _ = cam_maker(np.stack([images[r] for r in rows]))
        except Exception as err:  # noqa: BLE001 - e.g. a backbone whose spatial features do not match its pooled ones
            log.warning("no class activation maps: %s: %s", type(err).__name__, err)
            cam_note = f"No class activation maps: computing them failed ({type(err).__name__}: {str(err)[:200]})."
            cam_maker = None
    if cam_maker is not None and images:
        shown = gallery_rows(scored, thresholds)
        for i, row in enumerate(rows):
            for k, groups in shown.items():
                if any(row in members for members in groups.values()):
                    storage.write_bytes(storage.join(model_dir, model_files.CAMS_DIR, f"{row}-{k}.png"),
                                        cam_png(maps[i, :, :, k], THUMBNAIL_PX))
    storage.write_json(storage.join(model_dir, model_files.REPORT_CONTEXT_JSON), {"cam_note": cam_note})


def save_context(model_dir: str, **fields: Any) -> None:
    """Adds `fields` to evaluation/context.json (the dataset's summary, why there are no maps...)."""
    path = storage.join(model_dir, model_files.REPORT_CONTEXT_JSON)
    storage.write_json(path, {**(storage.read_json_if_exists(path) or {}), **fields})


# --- building the page from a model folder -----------------------------------------------------------

def _options_changed(run_flags: Mapping[str, Any]) -> list[list[str]]:
    from trainer.config import TaskOptions, TrainOptions

    changed = []
    for option in flags.declared(TaskOptions) + flags.declared(TrainOptions):
        if option.required or option.flag not in run_flags or option.env:
            continue  # required paths are shown on their own; env-supplied defaults vary by machine
        if run_flags[option.flag] != option.default:
            changed.append([f"--{option.flag}", json.dumps(run_flags[option.flag]), json.dumps(option.default)])
    return changed


def _training_sentence(run: model_files.RunInfo | None) -> str:
    if run is None:
        return "unknown: this folder has no run.json (the run did not finish, or predates it)"
    epochs = run.epochs_completed
    limit = run.flags.get("epochs")
    from trainer.config import DEFAULT_EPOCHS

    maximum = limit or DEFAULT_EPOCHS.get(run.training_path)
    stop = (f"the maximum of {maximum} epochs reached" if maximum and epochs >= maximum
            else "early stopping (the monitored loss stopped improving)")
    seconds = run.timings.get("total_s")
    took = f"{seconds:.0f} s" if seconds is not None else "unknown time"
    return f"{took}, {epochs} epoch(s) on the {run.training_path} path, {run.num_replicas_in_sync} replica(s); stopped by: {stop}"


def build(model_dir: str) -> tuple[str, list[str]]:
    """The page for `model_dir` and the sentences saying what the folder lacks (empty for a complete one)."""
    labels_path = storage.join(model_dir, model_files.LABELS_TXT)
    thresholds_path = storage.join(model_dir, model_files.THRESHOLDS_JSON)
    if not storage.exists(labels_path) and not storage.exists(thresholds_path):
        raise FileNotFoundError(f"--model_dir {model_dir}: no labels.txt or thresholds.json: not a model folder "
                                "written by `python -m trainer.task`")
    labels, thresholds = model_files.parse_thresholds_json(storage.read_text(thresholds_path))
    run = model_files.read_run_info(model_dir)
    metrics = storage.read_json_if_exists(storage.join(model_dir, model_files.METRICS_JSON))
    history = storage.read_json_if_exists(storage.join(model_dir, model_files.HISTORY_JSON)) or {}
    context = storage.read_json_if_exists(storage.join(model_dir, model_files.REPORT_CONTEXT_JSON)) or {}
    scores_path = storage.join(model_dir, model_files.TEST_SCORES_NPZ)
    notes: list[str] = []
    evaluation, evaluation_note = None, None
    if metrics is None:
        evaluation_note = ("The test split was empty, so there are no test metrics, curves or gallery: give the dataset a "
                           "test split (preprocess's split fractions) to judge the model on unseen examples.")
    elif not storage.exists(scores_path):
        evaluation_note = (f"This model folder was written before the report existed: it lacks {model_files.TEST_SCORES_NPZ} "
                           "(every test example's scores) and the gallery's thumbnails, so the page shows metrics.json's "
                           "numbers only - no curves, threshold control, confusions or gallery. Train again with this "
                           "version to get them.")
        notes.append(evaluation_note)
    else:
        scored = Scored.from_npz(storage.read_bytes(scores_path))
        images, cams = _stored_pictures(model_dir, scored, np.asarray(thresholds, np.float32))
        missing = sum(1 for groups in gallery_rows(scored, np.asarray(thresholds, np.float32)).values()
                      for rows in groups.values() for r in rows if r not in images)
        gallery_note = (f"{missing} gallery image(s) are missing from {model_files.THUMBNAILS_DIR}/ (deleted or never "
                        "written): those examples are listed without their picture.") if missing else None
        evaluation = evaluation_section(scored, labels, np.asarray(thresholds, np.float32), metrics, images, cams,
                                        context.get("cam_note"), gallery_note)
    dataset = context.get("dataset") or {}
    data = {
        "summary": {
            "model_dir": model_dir,
            "notes": notes,
            "dataset": {"path": dataset.get("path") or (run.dataset_json if run else "unknown"),
                        "splits": dataset.get("splits") or {}, "labels": labels},
            "backbone": (run.backbone.get("handle") or "unknown") if run else "unknown",
            "image_size": dataset.get("image_size", "unknown"),
            "training": _training_sentence(run),
            "tuned_on": run.thresholds_tuned_on if run else "unknown",
            "options_changed": _options_changed(run.flags) if run else None,
            "metrics": metrics,
        },
        "history": history,
        "evaluation": evaluation,
        "evaluation_note": evaluation_note,
    }
    return pages.render(pages.MODEL, f"Model report: {model_dir}", data), notes


def _stored_pictures(model_dir: str, scored: Scored, thresholds: np.ndarray
                     ) -> tuple[dict[int, bytes], dict[tuple[int, int], bytes]]:
    images, cams = {}, {}
    for k, groups in gallery_rows(scored, thresholds).items():
        for rows in groups.values():
            for r in rows:
                if r not in images:
                    path = storage.join(model_dir, model_files.THUMBNAILS_DIR, f"{r}.jpg")
                    if storage.exists(path):
                        images[r] = storage.read_bytes(path)
                cam = storage.join(model_dir, model_files.CAMS_DIR, f"{r}-{k}.png")
                if storage.exists(cam):
                    cams[(r, k)] = storage.read_bytes(cam)
    return images, cams


def write(model_dir: str) -> tuple[str, list[str]]:
    """Builds and writes report.html; returns its path and what the folder lacks."""
    page, notes = build(model_dir)
    path = storage.join(model_dir, model_files.REPORT_HTML)
    storage.write_text(path, page)
    return path, notes


def write_logged(model_dir: str) -> str | None:
    """write() for the end of a training run: a failure is logged, never raised (the model is done)."""
    try:
        return write(model_dir)[0]
    except Exception:  # noqa: BLE001 - the report must never cost the user the model
        log.exception("could not write %s in %s (the model is fine; rebuild the page with "
                      "`python -m trainer.report --model_dir %s`)", model_files.REPORT_HTML, model_dir, model_dir)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(prog="python -m trainer.report",
                          description="Rebuilds report.html in a model folder from what the folder holds.")
    from trainer.config import TaskOptions

    flags.add_options(parser, TaskOptions, only=["model_dir"])
    model_dir = parser.parse_args(argv).model_dir
    if not model_dir:
        parser.error("--model_dir is required")
    try:
        path, notes = write(model_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for text in notes:
        print(f"[report] note: {text}")
    print(f"[report] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
