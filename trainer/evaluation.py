"""Multi-label evaluation (numpy only) and the report written next to the model.

Conventions follow scikit-learn with ``zero_division=0``: a precision, recall or F-score whose
denominator is zero counts as 0. One deliberate difference: average precision is undefined for a
label without positives, so it is reported as ``null`` and left out of the macro average
(scikit-learn scores such a label 0, which drags the macro average down for a reason that says
nothing about the model); ``labels_without_positives`` counts them.
"""
from __future__ import annotations

import io
import json
import math
import posixpath
from collections.abc import Sequence

import numpy as np

from tagbeam.export import METRICS_JSON
from trainer.thresholds import DEFAULT_THRESHOLD, ranked_counts


def _fbeta(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, beta: float) -> np.ndarray:
    beta2 = beta * beta
    numerator = (1 + beta2) * tp
    denominator = numerator + beta2 * fn + fp
    return np.divide(numerator, denominator, out=np.zeros(np.shape(tp)), where=denominator > 0)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(np.shape(numerator)), where=denominator > 0)


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-label AP = sum over distinct thresholds of (recall step) x precision; NaN without positives.

    Equivalently, the mean over positives of the precision at the cut that first keeps them
    (the end of their group of tied scores), which is how it is computed here.
    """
    counts = ranked_counts(y_true, scores)
    positives = counts.tp[-1]
    rows = np.arange(len(counts.tp))[:, None]
    group_end = np.where(counts.is_cut, rows, len(counts.tp) - 1)
    group_end = np.minimum.accumulate(group_end[::-1], axis=0)[::-1]
    precision = counts.tp / (rows + 1)
    is_positive = np.diff(counts.tp, axis=0, prepend=0)
    hits = np.sum(is_positive * np.take_along_axis(precision, group_end, axis=0), axis=0)
    return np.divide(hits, positives, out=np.full(positives.shape, np.nan), where=positives > 0)


def _summary(y_true: np.ndarray, predicted: np.ndarray, beta: float) -> tuple[dict, dict]:
    """Set-based metrics of one thresholding; returns (averages, per-label arrays)."""
    tp = np.sum(predicted & y_true, axis=0)
    fp = np.sum(predicted & ~y_true, axis=0)
    fn = np.sum(~predicted & y_true, axis=0)
    row_tp = np.sum(predicted & y_true, axis=1)
    row_fp = np.sum(predicted & ~y_true, axis=1)
    row_fn = np.sum(~predicted & y_true, axis=1)
    per_label = {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _fbeta(tp, fp, fn, 1.0),
        "fbeta": _fbeta(tp, fp, fn, beta),
    }
    averages = {
        "macro_precision": float(np.mean(per_label["precision"])),
        "macro_recall": float(np.mean(per_label["recall"])),
        "macro_f1": float(np.mean(per_label["f1"])),
        "micro_f1": float(_fbeta(tp.sum(), fp.sum(), fn.sum(), 1.0)),
        "samples_f1": float(np.mean(_fbeta(row_tp, row_fp, row_fn, 1.0))),
        "macro_fbeta": float(np.mean(per_label["fbeta"])),
        "micro_fbeta": float(_fbeta(tp.sum(), fp.sum(), fn.sum(), beta)),
        "samples_fbeta": float(np.mean(_fbeta(row_tp, row_fp, row_fn, beta))),
        "hamming_loss": float(np.mean(predicted != y_true)),
        "subset_accuracy": float(np.mean(np.all(predicted == y_true, axis=1))),
    }
    return averages, per_label


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def evaluate(
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    thresholds: np.ndarray,
    beta: float = 2.0,
) -> dict:
    """Metrics at 0.5 (``at_default``) and at the tuned ``thresholds`` (``at_tuned``), plus AP.

    A label is predicted when ``probability >= threshold``. ``*_fbeta`` use ``beta`` (F2 by
    default: the Planet competition's recall-leaning score; ``samples_fbeta`` is its exact metric).
    The result is JSON-ready (plain floats, ``None`` for undefined values).
    """
    y_true = np.asarray(y_true) > 0
    probs = np.asarray(probs)
    thresholds = np.asarray(thresholds)
    if probs.shape != y_true.shape or probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"y_true and probs must be non-empty [examples, labels] of one shape; got {y_true.shape} and {probs.shape}.")
    if len(labels) != probs.shape[1] or thresholds.shape != (probs.shape[1],):
        raise ValueError(
            f"{probs.shape[1]} label columns need {probs.shape[1]} label names and thresholds; "
            f"got {len(labels)} names and thresholds of shape {thresholds.shape}."
        )
    at_default, default_per_label = _summary(y_true, probs >= DEFAULT_THRESHOLD, beta)
    at_tuned, tuned_per_label = _summary(y_true, probs >= thresholds, beta)
    ap = average_precision(y_true, probs)
    support = y_true.sum(axis=0)
    per_label = {}
    for k, name in enumerate(labels):
        per_label[name] = {
            "support": int(support[k]),
            "threshold": float(thresholds[k]),
            "average_precision": _finite_or_none(ap[k]),
            "at_default": {key: float(values[k]) for key, values in default_per_label.items()},
            "at_tuned": {key: float(values[k]) for key, values in tuned_per_label.items()},
        }
    defined = ~np.isnan(ap)
    return {
        "examples": len(probs),
        "num_labels": int(probs.shape[1]),
        "beta": float(beta),
        "default_threshold": DEFAULT_THRESHOLD,
        "macro_average_precision": float(np.mean(ap[defined])) if defined.any() else None,
        "micro_average_precision": _finite_or_none(average_precision(y_true.reshape(-1, 1), probs.reshape(-1, 1))[0]),
        "labels_without_positives": int(np.sum(~defined)),
        "at_default": at_default,
        "at_tuned": at_tuned,
        "per_label": per_label,
    }


def _figure(width: float, height: float):
    # A bare Figure (no pyplot) keeps no global state and needs no display: safe in workers.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _learning_curves(history: dict[str, list[float]]):
    from matplotlib.ticker import MaxNLocator

    names = [name for name in history if not name.startswith("val_") and len(history[name]) > 0]
    fig = _figure(4.2 * min(len(names), 3), 3.2 * math.ceil(len(names) / 3))
    for i, name in enumerate(names):
        ax = fig.add_subplot(math.ceil(len(names) / 3), min(len(names), 3), i + 1)
        epochs = np.arange(1, len(history[name]) + 1)
        validation = history.get(f"val_{name}")
        ax.plot(epochs, history[name], marker="o", label="train" if validation else None)
        if validation:
            ax.plot(np.arange(1, len(validation) + 1), validation, marker="o", label="val")
            ax.legend()
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return fig


def _per_label_f1(metrics: dict):
    names = list(metrics["per_label"])
    default = [metrics["per_label"][n]["at_default"]["f1"] for n in names]
    tuned = [metrics["per_label"][n]["at_tuned"]["f1"] for n in names]
    fig = _figure(8, 1.2 + 0.32 * len(names))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y - 0.2, default, height=0.4, label=f"F1 at {metrics['default_threshold']}")
    ax.barh(y + 0.2, tuned, height=0.4, label="F1 at tuned threshold")
    ax.set_yticks(y, labels=[f"{n} (n={metrics['per_label'][n]['support']})" for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_title(f"Per-label F1: macro {metrics['at_default']['macro_f1']:.3f} at 0.5, {metrics['at_tuned']['macro_f1']:.3f} tuned")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=2, frameon=False)
    return fig


def _sample_grid(samples: Sequence[tuple[np.ndarray, list[str], list[str]]]):
    """Each image with its predicted labels (green: correct, red: wrong) and missed ones (grey)."""
    columns = min(4, len(samples))
    rows = math.ceil(len(samples) / columns)
    most_lines = max(len(set(true) | set(pred)) for _, true, pred in samples)
    fig = _figure(3.0 * columns, 0.4 + rows * (3.0 + 0.2 * most_lines))
    fig.suptitle("predicted labels: green correct, red wrong; grey: missed", fontsize=9)
    for i, (image, true, pred) in enumerate(samples):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(np.asarray(image))
        ax.set_axis_off()
        lines = [(name, "green" if name in true else "red") for name in pred]
        lines += [(f"missed: {name}", "grey") for name in true if name not in pred]
        for j, (text, colour) in enumerate(lines or [("(no labels)", "black")]):
            ax.text(0.0, -0.03 - 0.075 * j, text, color=colour, fontsize=8, transform=ax.transAxes, va="top")
    return fig


def _write_figure(fig, path: str) -> None:
    import tensorflow as tf

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    with tf.io.gfile.GFile(path, "wb") as out:
        out.write(buffer.getvalue())


def write_report(
    out_dir: str,
    metrics: dict,
    history: dict[str, list[float]] | None,
    samples: Sequence[tuple[np.ndarray, list[str], list[str]]],
) -> list[str]:
    """Writes metrics.json, learning_curves.png (if history), per_label_f1.png, samples.png (if samples).

    ``samples`` are (uint8 HxWx3 image, true label names, predicted label names). ``out_dir`` may
    be local or gs://. Returns the paths written.
    """
    import tensorflow as tf

    tf.io.gfile.makedirs(out_dir)
    written = [posixpath.join(out_dir, METRICS_JSON)]
    with tf.io.gfile.GFile(written[0], "w") as out:
        # allow_nan=False: NaN is not JSON; evaluate() reports undefined values as null.
        out.write(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    figures = {"per_label_f1.png": lambda: _per_label_f1(metrics)}
    if history and any(len(v) > 0 for k, v in history.items() if not k.startswith("val_")):
        figures["learning_curves.png"] = lambda: _learning_curves(history)
    if samples:
        figures["samples.png"] = lambda: _sample_grid(samples)
    for name, make in figures.items():
        path = posixpath.join(out_dir, name)
        _write_figure(make(), path)
        written.append(path)
    return written
