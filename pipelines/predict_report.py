"""`summary.html` beside a batch prediction's outputs, and the scoring of labelled manifests.

What the page needs is gathered by bounded combiners inside the pipeline: per-label score
histograms and predicted counts, a sample of predictions with their images, a few rejected rows per
reason. When the manifest carries labels, every row's (id, labels, scores) is gathered as well (like
the test split of a training run) and the page gets the model report's evaluation section
(trainer/report.py: curves, threshold control, confusions, error gallery), whose thumbnails a
combiner keeps per label as it goes: the most confident false positives, the least confident missed
positives and the most confident correct rows at the model's own thresholds.
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np

from tagbeam import pages, storage
from trainer import report

SUMMARY_HTML = "summary.html"
HISTOGRAM_BINS = 20
GALLERY = 24
REJECTED_EXAMPLES = 3


def thumbnail(image: bytes) -> bytes | None:
    """A small JPEG of the model's input image (the stored bytes: JPEG or PNG), or None if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as picture:
            return report.thumbnail_jpeg(np.asarray(picture.convert("RGB")))
    except Exception:  # noqa: BLE001 - the page then says the picture is missing
        return None


class Histograms(beam.CombineFn):
    """(probabilities [K], predicted [K]) -> (histogram counts [K, BINS], predicted counts [K])."""

    def __init__(self, labels: int) -> None:
        self._labels = labels

    def create_accumulator(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((self._labels, HISTOGRAM_BINS), np.int64), np.zeros(self._labels, np.int64)

    def add_input(self, acc: tuple[np.ndarray, np.ndarray], item: tuple[np.ndarray, np.ndarray]):
        probabilities, predicted = item
        bins = np.clip((np.asarray(probabilities) * HISTOGRAM_BINS).astype(int), 0, HISTOGRAM_BINS - 1)
        acc[0][np.arange(self._labels), bins] += 1
        acc[1][:] += np.asarray(predicted) > 0
        return acc

    def merge_accumulators(self, accumulators: Iterable[tuple[np.ndarray, np.ndarray]]):
        histograms, predicted = self.create_accumulator()
        for h, p in accumulators:
            histograms += h
            predicted += p
        return histograms, predicted

    def extract_output(self, acc: tuple[np.ndarray, np.ndarray]) -> tuple[list[list[int]], list[int]]:
        return acc[0].tolist(), acc[1].tolist()


class GalleryCandidates(beam.CombineFn):
    """Per label, the rows trainer.report.gallery_rows would show, with thumbnails: the same order and
    tie-breaks when rows are numbered by id (the page sorts the scored rows by id)."""

    def __init__(self, thresholds: Sequence[float]) -> None:
        self._thresholds = np.asarray(thresholds, np.float32)
        self._limits = {"fp": report.GALLERY_FALSE_POSITIVES, "fn": report.GALLERY_MISSED, "tp": report.GALLERY_CORRECT}

    def create_accumulator(self) -> dict[tuple[int, str], list[tuple[float, str, bytes | None]]]:
        return {}

    def _trim(self, kind: str, items: list) -> list:
        by_id = sorted(items, key=lambda item: item[1], reverse=kind == "fn")
        return sorted(by_id, key=lambda item: item[0] if kind == "fn" else -item[0])[: self._limits[kind]]

    def add_input(self, acc: dict, item: tuple[str, np.ndarray, np.ndarray, bytes]) -> dict:
        row_id, truth, probabilities, image = item
        probabilities = np.asarray(probabilities, np.float32)
        predicted = probabilities >= self._thresholds
        picture: list[bytes | None] = []
        for k in range(len(self._thresholds)):
            kind = ("tp" if predicted[k] else "fn") if truth[k] else ("fp" if predicted[k] else None)
            if kind is None:
                continue
            kept = acc.setdefault((k, kind), [])
            candidate = (float(probabilities[k]), row_id, None)
            if len(kept) >= self._limits[kind] and all(c is not candidate for c in self._trim(kind, kept + [candidate])):
                continue  # would not be shown: no thumbnail needed
            if not picture:
                picture.append(thumbnail(image))
            kept.append((candidate[0], row_id, picture[0]))
            acc[(k, kind)] = self._trim(kind, kept)
        return acc

    def merge_accumulators(self, accumulators: Iterable[dict]) -> dict:
        merged: dict = {}
        for acc in accumulators:
            for key, items in acc.items():
                merged[key] = self._trim(key[1], merged.get(key, []) + items)
        return merged

    def extract_output(self, acc: dict) -> dict[str, bytes]:
        return {row_id: picture for items in acc.values() for _, row_id, picture in items if picture is not None}


def multi_hot(names: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    index = {name: k for k, name in enumerate(labels)}
    truth = np.zeros(len(labels), np.uint8)
    for name in names:
        if name in index:
            truth[index[name]] = 1
    return truth


def scored_rows(rows: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> report.Scored:
    """The labelled rows as report.Scored, ordered by id (the gallery's tie-break order)."""
    ordered = sorted(rows, key=lambda row: row[0])
    labels = len(ordered[0][1])
    return report.Scored(np.array([r[0] for r in ordered], dtype=str),
                         np.array([r[1] for r in ordered], dtype=bool).reshape(-1, labels),
                         np.array([r[2] for r in ordered], dtype=np.float32).reshape(-1, labels))


def evaluation(rows: Sequence[tuple[str, np.ndarray, np.ndarray]], labels: Sequence[str], thresholds: Sequence[float],
               pictures: dict[str, bytes]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics at the model's thresholds for summary.json, the page's evaluation section)."""
    from trainer.evaluation import evaluate

    scored = scored_rows(rows)
    thresholds = np.asarray(thresholds, np.float32)
    metrics = evaluate(scored.truth, scored.scores, labels, thresholds, beta=1.0)
    images = {row: pictures[str(row_id)] for row, row_id in enumerate(scored.ids) if str(row_id) in pictures}
    section = report.evaluation_section(
        scored, labels, thresholds, metrics, images, {},
        "No class activation maps in a prediction summary: they need the backbone's spatial features, which the "
        "servable export does not carry; the model folder's report.html has them for its test split.")
    return metrics, section


def write_page(output: str, summary: dict[str, Any], labels: Sequence[str], thresholds: Sequence[float],
               histograms: tuple[list[list[int]], list[int]], sample: Sequence[tuple[str, np.ndarray, bytes]],
               rejected_examples: dict[str, list[str]], section: dict[str, Any] | None, note: str | None) -> str:
    """Writes summary.html under `output`; returns its path."""
    gallery = []
    cut = np.asarray(thresholds, np.float32)  # the evaluation's float32 comparison
    for row_id, probabilities, image in sorted(sample, key=lambda s: s[0]):
        picture = thumbnail(image)
        chosen = [[k, float(p)] for k, (p, t) in enumerate(zip(probabilities, cut, strict=True)) if np.float32(p) >= t]
        gallery.append({"id": row_id, "labels": chosen, "thumb": pages.data_uri("image/jpeg", picture) if picture else None})
    rejected = [{"reason": reason, "count": n, "examples": rejected_examples.get(reason, [])}
                for reason, n in summary["rejected_by_reason"].items()]
    facts = [["model", summary["model"]], ["input", str(summary["options"].get("input"))], ["output", output],
             ["rows read", summary["input_rows"]], ["predicted", summary["predicted"]], ["rejected", summary["rejected"]]]
    if "metrics" in summary:
        m = summary["metrics"]
        ap = "n/a" if m["macro_average_precision"] is None else f"{m['macro_average_precision']:.3f}"
        facts.append(["scored against the manifest's labels",
                      f"macro F1 {m['at_tuned']['macro_f1']:.3f}, micro F1 {m['at_tuned']['micro_f1']:.3f} at the model's "
                      f"thresholds; mAP {ap}"])
    notes = [] if summary["predicted"] else ["No row could be predicted: see the rejected rows below."]
    data = {
        "summary": {"facts": facts, "rejected": rejected, "scored": summary["predicted"], "notes": notes},
        "labels": list(labels), "thresholds": [float(t) for t in thresholds], "bins": HISTOGRAM_BINS,
        "histograms": histograms[0], "predicted_counts": histograms[1], "gallery": gallery,
        "evaluation": section, "evaluation_note": note,
    }
    path = storage.join(output, SUMMARY_HTML)
    storage.write_text(path, pages.render(pages.PREDICT, f"Batch prediction: {output}", data))
    return path
