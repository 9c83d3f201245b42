"""Per-label threshold tuning: known optima, ties, fallbacks, and optimality against brute force."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, fbeta_score

from tagbeam.export import parse_thresholds_json, thresholds_json
from trainer.thresholds import tune_thresholds

# One label; positives at 0.9, 0.8, 0.35 and negatives at 0.7, 0.3, 0.1. Keeping the top k:
#   k:   1     2     3      4      5     6
#   F1: 0.5   0.8   0.667  0.857  0.75  0.667   -> best k=4, threshold between 0.35 and 0.3
#   F0.5: 0.714 0.909 0.714 0.789 ...            -> best k=2, threshold between 0.8 and 0.7
SCORES = np.array([[0.9], [0.8], [0.7], [0.35], [0.3], [0.1]])
TRUTH = np.array([[1], [1], [0], [1], [0], [0]])


def test_known_optimum_is_the_midpoint_between_kept_and_dropped_scores():
    np.testing.assert_allclose(tune_thresholds(TRUTH, SCORES), [0.325])
    np.testing.assert_allclose(tune_thresholds(TRUTH, SCORES, beta=2.0), [0.325])
    np.testing.assert_allclose(tune_thresholds(TRUTH, SCORES, beta=0.5), [0.75])


def test_labels_are_tuned_independently_and_fallback_to_half_without_positives():
    y = np.hstack([TRUTH, np.zeros_like(TRUTH), np.ones_like(TRUTH)])
    probs = np.hstack([SCORES, SCORES, SCORES])
    # All positive: the best cut keeps everything, so the threshold is the lowest score itself.
    np.testing.assert_allclose(tune_thresholds(y, probs), [0.325, 0.5, 0.1])


def test_tied_scores_are_never_split():
    # Keeping only the first 0.6 would be perfect, but it ties with a negative: the choice is
    # both (F1 = 2/3 with threshold 0.4, the midpoint to 0.2) or none of them.
    y = np.array([[1], [0], [0]])
    probs = np.array([[0.6], [0.6], [0.2]])
    threshold = tune_thresholds(y, probs)[0]
    assert threshold == pytest.approx(0.4)
    assert f1_score(y[:, 0], probs[:, 0] >= threshold) == pytest.approx(2 / 3)


def test_adjacent_float32_scores_are_still_separated():
    high = np.float32(0.5)
    low = np.nextafter(high, np.float32(0))
    y = np.array([[1], [0]])
    probs = np.array([[high], [low]], dtype=np.float32)
    threshold = tune_thresholds(y, probs)
    assert threshold.dtype == np.float32
    assert (probs[:, 0] >= threshold[0]).tolist() == [True, False]


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_tuned_thresholds_reach_the_brute_force_optimum_and_beat_half(beta):
    rng = np.random.default_rng(0)
    n, k = 300, 6
    y = (rng.random((n, k)) < [0.05, 0.2, 0.5, 0.3, 0.1, 0.7]).astype(int)
    # Rounded to 2 decimals so that many scores tie.
    probs = np.clip(0.25 * y + rng.random((n, k)) * 0.75, 0, 1).round(2)
    thresholds = tune_thresholds(y, probs, beta=beta)
    for label in range(k):
        truth, scores = y[:, label], probs[:, label]
        tuned = fbeta_score(truth, scores >= thresholds[label], beta=beta, zero_division=0)
        best = max(fbeta_score(truth, scores >= t, beta=beta, zero_division=0) for t in np.unique(scores))
        assert tuned == pytest.approx(best), f"label {label}"
        assert tuned >= fbeta_score(truth, scores >= 0.5, beta=beta, zero_division=0), f"label {label}"


def test_bad_input_is_rejected_with_the_shapes():
    with pytest.raises(ValueError, match=r"\(3, 2\) and \(3, 1\)"):
        tune_thresholds(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="examples > 0"):
        tune_thresholds(np.zeros((0, 2)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="beta must be > 0"):
        tune_thresholds(TRUTH, SCORES, beta=0)


def test_json_round_trip_keeps_label_order():
    labels, values = parse_thresholds_json(thresholds_json(["b", "a", "c"], np.array([0.1, 0.7, 0.5], np.float32)))
    assert labels == ["b", "a", "c"]
    np.testing.assert_allclose(values, [0.1, 0.7, 0.5])
