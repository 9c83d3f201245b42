"""Per-label decision thresholds that maximise F-beta on validation data.

A label is predicted when ``probability >= threshold``. For each label the scores are sorted in
decreasing order and TP / FP counted cumulatively, so every cut "predict the top k" is scored at
once (O(n log n) per label, vectorised over labels). Only cuts between *different* scores are
valid, since tied scores cannot be separated by a threshold. The threshold chosen for a cut is
the midpoint between the last score kept and the first score dropped (a margin on both sides for
unseen data); when every example is kept it is the lowest score itself. Ties in F-beta go to the
highest threshold (the fewest positive predictions). A label without positives in the data has
no meaningful optimum and keeps 0.5.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

DEFAULT_THRESHOLD = 0.5


class RankedCounts(NamedTuple):
    """Cumulative counts after keeping the top k+1 scores of each label (arrays [n, K])."""

    scores: np.ndarray  # scores sorted in decreasing order, per label
    tp: np.ndarray  # true positives among the kept examples
    fp: np.ndarray  # false positives among the kept examples
    is_cut: np.ndarray  # True where the next score differs (or at the end): a threshold can cut here


def ranked_counts(y_true: np.ndarray, scores: np.ndarray) -> RankedCounts:
    """Sorts each label's scores decreasingly and counts TP / FP at every cut position."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores)
    if y_true.shape != scores.shape or y_true.ndim != 2:
        raise ValueError(f"y_true and scores must be [examples, labels] of one shape; got {y_true.shape} and {scores.shape}.")
    order = np.argsort(-scores, axis=0, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=0)
    positives = np.take_along_axis(y_true, order, axis=0) > 0
    tp = np.cumsum(positives, axis=0)
    fp = np.arange(1, len(scores) + 1)[:, None] - tp
    is_cut = np.ones_like(positives)
    is_cut[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    return RankedCounts(sorted_scores, tp, fp, is_cut)


def tune_thresholds(y_true: np.ndarray, probs: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """Per-label thresholds (same dtype as ``probs``) maximising F-beta of ``probs >= threshold``."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}.")
    probs = np.asarray(probs)
    if not np.issubdtype(probs.dtype, np.floating):
        probs = probs.astype(np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"tune_thresholds needs probabilities of shape [examples > 0, labels]; got {probs.shape}.")
    counts = ranked_counts(y_true, probs)
    positives = counts.tp[-1]
    beta2 = beta * beta
    # F-beta = (1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP), with FN = positives - TP.
    denominator = (1 + beta2) * counts.tp + beta2 * (positives - counts.tp) + counts.fp
    fbeta = np.divide((1 + beta2) * counts.tp, denominator, out=np.zeros(counts.tp.shape), where=denominator > 0)
    best = np.argmax(np.where(counts.is_cut, fbeta, -1.0), axis=0)

    columns = np.arange(probs.shape[1])
    kept = counts.scores[best, columns]
    dropped = counts.scores[np.minimum(best + 1, len(probs) - 1), columns]
    midpoint = ((kept.astype(np.float64) + dropped) / 2).astype(probs.dtype)
    # The midpoint can round onto a neighbour when the two scores are adjacent floats; the kept
    # score itself still separates them (>= keeps it, the dropped one is strictly smaller).
    separates = (best < len(probs) - 1) & (midpoint > dropped) & (midpoint <= kept)
    thresholds = np.where(separates, midpoint, kept)
    return np.where(positives > 0, thresholds, DEFAULT_THRESHOLD).astype(probs.dtype)
