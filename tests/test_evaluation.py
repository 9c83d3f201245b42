"""evaluate() against scikit-learn, and write_report()'s files (local and a non-local filesystem)."""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn import metrics as skm

from trainer.evaluation import evaluate, write_report
from trainer.thresholds import tune_thresholds

LABELS = ["cat", "dog", "sea", "sky", "snow", "never"]


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = (rng.random((250, len(LABELS))) < [0.1, 0.3, 0.5, 0.2, 0.05, 0.0]).astype(int)
    # Rounded so that scores tie (AP must group ties like scikit-learn does).
    probs = np.clip(0.3 * y + 0.7 * rng.random(y.shape), 0, 1).round(2)
    return y, probs, tune_thresholds(y, probs, beta=2.0)


def test_every_number_matches_sklearn(case):
    y, probs, thresholds = case
    result = evaluate(y, probs, LABELS, thresholds, beta=2.0)
    assert result["examples"] == 250 and result["num_labels"] == 6 and result["beta"] == 2.0
    for key, predicted in (("at_default", probs >= 0.5), ("at_tuned", probs >= thresholds)):
        got = result[key]
        for average in ("macro", "micro", "samples"):
            assert got[f"{average}_f1"] == pytest.approx(skm.f1_score(y, predicted, average=average, zero_division=0))
            assert got[f"{average}_fbeta"] == pytest.approx(
                skm.fbeta_score(y, predicted, beta=2.0, average=average, zero_division=0))
        assert got["macro_precision"] == pytest.approx(skm.precision_score(y, predicted, average="macro", zero_division=0))
        assert got["macro_recall"] == pytest.approx(skm.recall_score(y, predicted, average="macro", zero_division=0))
        assert got["hamming_loss"] == pytest.approx(skm.hamming_loss(y, predicted))
        assert got["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
        precision, recall, f1, support = skm.precision_recall_fscore_support(y, predicted, zero_division=0)
        for k, name in enumerate(LABELS):
            per_label = result["per_label"][name]
            assert per_label[key]["precision"] == pytest.approx(precision[k])
            assert per_label[key]["recall"] == pytest.approx(recall[k])
            assert per_label[key]["f1"] == pytest.approx(f1[k])
            assert per_label["support"] == support[k]
            assert per_label["threshold"] == pytest.approx(thresholds[k])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the label without positives
        ap = skm.average_precision_score(y, probs, average=None)
    for k, name in enumerate(LABELS[:-1]):
        assert result["per_label"][name]["average_precision"] == pytest.approx(ap[k])
    # "never" has no positives: AP undefined (sklearn says 0) and left out of the macro mean.
    assert result["per_label"]["never"]["average_precision"] is None
    assert result["labels_without_positives"] == 1
    assert result["macro_average_precision"] == pytest.approx(np.mean(ap[:-1]))
    assert result["micro_average_precision"] == pytest.approx(skm.average_precision_score(y, probs, average="micro"))
    # Tuned for F2, so at least as good as 0.5 on the data they were tuned on.
    assert result["at_tuned"]["macro_fbeta"] >= result["at_default"]["macro_fbeta"]


def test_hand_checked_small_case():
    y = np.array([[1, 0], [0, 1], [1, 1]])
    probs = np.array([[0.9, 0.6], [0.4, 0.7], [0.6, 0.2]])
    result = evaluate(y, probs, ["a", "b"], np.array([0.5, 0.5]), beta=1.0)
    # Predicted at 0.5: [[1,1],[0,1],[1,0]] -> a: TP 2; b: TP 1, FP 1, FN 1.
    assert result["at_default"]["macro_f1"] == pytest.approx((1.0 + 0.5) / 2)
    assert result["at_default"]["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert result["at_default"]["hamming_loss"] == pytest.approx(2 / 6)
    assert result["at_default"]["subset_accuracy"] == pytest.approx(1 / 3)
    # AP of b: ranked 0.7 (pos), 0.6 (neg), 0.2 (pos) -> (1/1 + 2/3) / 2.
    assert result["per_label"]["b"]["average_precision"] == pytest.approx((1 + 2 / 3) / 2)


def test_mismatched_inputs_name_the_shapes():
    with pytest.raises(ValueError, match=r"got 2 names"):
        evaluate(np.zeros((4, 3)), np.zeros((4, 3)), ["a", "b"], np.full(3, 0.5))
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
        evaluate(np.zeros((4, 3)), np.zeros((4, 2)), ["a", "b"], np.full(2, 0.5))


def _check_png(data: bytes, min_width: int, min_height: int) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    width, height = image.size
    assert width >= min_width and height >= min_height, image.size
    assert width <= 3000 and height <= 3000, image.size
    assert np.asarray(image.convert("L")).std() > 5  # something was drawn


@pytest.mark.parametrize("base", ["local", "ram"])
def test_write_report_writes_metrics_and_plots(case, tmp_path, base):
    y, probs, thresholds = case
    metrics = evaluate(y, probs, LABELS, thresholds)
    history = {"loss": [0.7, 0.5, 0.4], "val_loss": [0.72, 0.6, 0.55], "macro_f1": [0.2, 0.4, 0.5],
               "val_macro_f1": [0.2, 0.35, 0.4], "auc_pr": [0.3, 0.5, 0.6], "val_auc_pr": [0.3, 0.45, 0.5],
               "learning_rate": [1e-3, 1e-3, 5e-4]}
    rng = np.random.default_rng(1)
    samples = [(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8), ["cat", "sea"], ["cat", "sky"]),
               (rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), [], ["dog"]),
               (rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), ["snow"], [])]
    # ram:// is TensorFlow's in-memory filesystem: proves every write goes through tf.io.gfile
    # (gs:// uses the same path; the GCS emulator cannot be reached by tf.io.gfile).
    out_dir = str(tmp_path / "report") if base == "local" else f"ram://report-{tmp_path.name}"
    written = write_report(out_dir, metrics, history, samples)
    names = sorted(path.rsplit("/", 1)[-1] for path in written)
    assert names == ["learning_curves.png", "metrics.json", "per_label_f1.png", "samples.png"]
    assert all(tf.io.gfile.exists(path) for path in written)
    read = {path.rsplit("/", 1)[-1]: tf.io.gfile.GFile(path, "rb").read() for path in written}
    assert json.loads(read["metrics.json"]) == metrics
    _check_png(read["learning_curves.png"], 600, 300)
    _check_png(read["per_label_f1.png"], 600, 200)
    _check_png(read["samples.png"], 600, 250)


def test_write_report_without_history_or_samples(case, tmp_path):
    y, probs, thresholds = case
    written = write_report(str(tmp_path), evaluate(y, probs, LABELS, thresholds), None, [])
    assert sorted(p.rsplit("/", 1)[-1] for p in written) == ["metrics.json", "per_label_f1.png"]
