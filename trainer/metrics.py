"""Training-time multi-label metrics that take LOGITS as ``y_pred``.

They are tf_keras' own ``F1Score`` and ``AUC`` (so their state is distribution-aware and they
reset per epoch); the only addition is the sigmoid. Note that ``F1Score`` predicts a label when
``probability > 0.5`` (strictly), while evaluation and serving use ``probability >= threshold``;
the two differ only for a logit of exactly 0.
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras


@tf_keras.saving.register_keras_serializable(package="trainer")
class LogitsF1Score(tf_keras.metrics.F1Score):
    """``tf_keras.metrics.F1Score`` fed with ``sigmoid(logits)``."""

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None):
        return super().update_state(y_true, tf.sigmoid(y_pred), sample_weight)


def training_metrics(num_labels: int) -> list[tf_keras.metrics.Metric]:
    """``macro_f1`` and ``micro_f1`` at 0.5, and multi-label PR-AUC (``auc_pr``), all on logits."""
    if num_labels < 1:
        raise ValueError(f"training_metrics needs num_labels >= 1, got {num_labels}.")
    # float32 whatever the global policy: under a mixed one F1Score's state would become autocast
    # variables, which MirroredStrategy cannot read when it sums them across replicas.
    return [
        LogitsF1Score(average="macro", threshold=0.5, name="macro_f1", dtype="float32"),
        LogitsF1Score(average="micro", threshold=0.5, name="micro_f1", dtype="float32"),
        # 200 thresholds (the default) under-resolves the PR curve for confident models.
        tf_keras.metrics.AUC(
            curve="PR", multi_label=True, num_labels=num_labels, from_logits=True,
            num_thresholds=500, name="auc_pr", dtype="float32",
        ),
    ]
