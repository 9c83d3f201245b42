"""Training metrics on logits, checked against scikit-learn, alone and in a 2-replica fit."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from sklearn.metrics import average_precision_score, f1_score

from trainer.metrics import training_metrics

K = 5
PREVALENCE = [0.1, 0.3, 0.5, 0.2, 0.05]
# Keras' PR-AUC integrates the precision-recall curve on a fixed grid of thresholds with
# Davis & Goadrich interpolation between them; scikit-learn's average precision is the step-wise
# sum over every distinct score. They estimate the same area but are not equal: on these sizes
# they differ by 0.004-0.011 (measured), hence the tolerance.
AUC_PR_TOLERANCE = 0.02


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, K)) < PREVALENCE).astype(np.float32)
    logits = ((2 * y - 1) * rng.uniform(0, 2, (n, K)) + rng.normal(0, 1.5, (n, K))).astype(np.float32)
    return y, logits


def _sklearn(y: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    predicted = probs > 0.5  # tf_keras F1Score thresholds strictly
    return {
        "macro_f1": f1_score(y, predicted, average="macro", zero_division=0),
        "micro_f1": f1_score(y, predicted, average="micro", zero_division=0),
        "auc_pr": average_precision_score(y, probs, average="macro"),
    }


def test_metric_names_and_values_match_sklearn_over_several_batches():
    y, logits = _data(400, seed=0)
    metrics = training_metrics(K)
    assert [m.name for m in metrics] == ["macro_f1", "micro_f1", "auc_pr"]
    for start in range(0, len(y), 128):  # state must accumulate across batches
        for metric in metrics:
            metric.update_state(y[start : start + 128], logits[start : start + 128])
    expected = _sklearn(y, logits)
    got = {m.name: float(m.result()) for m in metrics}
    assert got["macro_f1"] == pytest.approx(expected["macro_f1"], abs=1e-5)
    assert got["micro_f1"] == pytest.approx(expected["micro_f1"], abs=1e-5)
    assert got["auc_pr"] == pytest.approx(expected["auc_pr"], abs=AUC_PR_TOLERANCE)
    # Logits, not probabilities: feeding sigmoid outputs as "logits" would shift every prediction.
    assert got["macro_f1"] != pytest.approx(_sklearn(y, 1 / (1 + np.exp(-logits)))["macro_f1"], abs=1e-3)


def test_macro_f1_counts_a_never_predicted_absent_label_as_zero_like_sklearn():
    y = np.array([[1, 0], [0, 0], [1, 0]], dtype=np.float32)
    logits = np.array([[3.0, -3.0], [-3.0, -3.0], [3.0, -3.0]], dtype=np.float32)
    macro = training_metrics(2)[0]
    macro.update_state(y, logits)
    assert float(macro.result()) == pytest.approx(f1_score(y, logits > 0, average="macro", zero_division=0)) == 0.5


def test_metrics_aggregate_across_two_replicas_in_fit_and_evaluate():
    y, _ = _data(96, seed=1)
    x = np.random.default_rng(2).normal(size=(96, 8)).astype(np.float32) + y @ np.ones((K, 8), np.float32)
    # ReductionToOneDevice: see test_losses._strategy for why tests avoid collective all-reduce.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        tf_keras.utils.set_random_seed(0)
        model = tf_keras.Sequential([tf_keras.Input([8]), tf_keras.layers.Dense(K)])
        model.compile(optimizer=tf_keras.optimizers.Adam(0.05),
                      loss=tf_keras.losses.BinaryCrossentropy(from_logits=True), metrics=training_metrics(K))
        history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert {"macro_f1", "micro_f1", "auc_pr"} <= set(history.history)
    # Batches of 32 split 16/16 over the replicas: the result must cover all 96 rows.
    result = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    expected = _sklearn(y, model.predict(x, batch_size=96, verbose=0))
    assert result["macro_f1"] == pytest.approx(expected["macro_f1"], abs=1e-5)
    assert result["micro_f1"] == pytest.approx(expected["micro_f1"], abs=1e-5)
    assert result["auc_pr"] == pytest.approx(expected["auc_pr"], abs=AUC_PR_TOLERANCE)


def test_training_metrics_rejects_zero_labels():
    with pytest.raises(ValueError, match="num_labels >= 1"):
        training_metrics(0)
