"""Multi-label losses on logits: binary cross-entropy and macro soft-F1.

Both are ``tf_keras.losses.Loss`` subclasses with the default reduction, so ``model.compile``
handles distribution: under ``MirroredStrategy`` Keras scales each replica's loss by
``1 / num_replicas`` and sums the gradients across replicas.

- ``bce`` returns one value per example (the mean over labels); Keras then averages over the
  batch, so the distributed loss is the mean over the global batch.
- ``soft_f1`` is a batch-level loss: the soft TP / FP / FN counts are summed over the *global*
  batch with a replica all-reduce before the F1 is formed. Every replica therefore computes the
  same value, the Keras ``1 / num_replicas`` scaling makes the summed loss equal to it, and the
  all-reduce's gradient (itself an all-reduce) makes the summed gradients equal to the gradient of
  the global-batch soft-F1. The result does not depend on the number of replicas. Sample weights
  are not supported by ``soft_f1`` (a batch-level cost has no per-example terms to weight).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tf_keras

LOSS_NAMES = ("bce", "soft_f1")

# Keeps soft-F1 finite for a label that has neither positives nor predicted mass in a batch.
_EPSILON = 1e-7


@tf_keras.saving.register_keras_serializable(package="trainer")
class MultiLabelBCE(tf_keras.losses.Loss):
    """Sigmoid cross-entropy from logits, optionally weighting each label's positive term."""

    def __init__(self, pos_weight: Sequence[float] | None = None, name: str = "bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pos_weight = None if pos_weight is None else [float(w) for w in pos_weight]

    def call(self, y_true: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        logits = tf.convert_to_tensor(logits)
        y_true = tf.cast(y_true, logits.dtype)
        if self.pos_weight is None:
            per_label = tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true, logits=logits)
        else:
            per_label = tf.nn.weighted_cross_entropy_with_logits(
                labels=y_true, logits=logits, pos_weight=tf.constant(self.pos_weight, logits.dtype)
            )
        return tf.reduce_mean(per_label, axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "pos_weight": self.pos_weight}


@tf_keras.saving.register_keras_serializable(package="trainer")
class MacroSoftF1(tf_keras.losses.Loss):
    """``1 - mean over labels of soft-F1``, with soft counts from sigmoid probabilities.

    soft TP = sum(p * y), soft FP = sum(p * (1 - y)), soft FN = sum((1 - p) * y) over the
    global batch; soft-F1 = 2 TP / (2 TP + FP + FN).
    """

    def __init__(self, name: str = "soft_f1", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        logits = tf.convert_to_tensor(logits)
        y_true = tf.cast(y_true, logits.dtype)
        probs = tf.sigmoid(logits)
        counts = tf.stack(
            [
                tf.reduce_sum(probs * y_true, axis=0),
                tf.reduce_sum(probs * (1.0 - y_true), axis=0),
                tf.reduce_sum((1.0 - probs) * y_true, axis=0),
            ]
        )
        replica = tf.distribute.get_replica_context()
        # None means cross-replica context (called directly inside strategy.scope()): the batch
        # given is then already the whole batch.
        if replica is not None and replica.num_replicas_in_sync > 1:
            counts = replica.all_reduce(tf.distribute.ReduceOp.SUM, counts)
        tp, fp, fn = counts[0], counts[1], counts[2]
        soft_f1 = 2.0 * tp / (2.0 * tp + fp + fn + _EPSILON)
        return 1.0 - tf.reduce_mean(soft_f1)


def get_loss(name: str, pos_weight: np.ndarray | None = None) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """The loss called ``name`` ("bce" or "soft_f1"), taking (multi-hot y_true, logits).

    ``pos_weight`` (one weight per label, e.g. from ``positive_weights``) only applies to "bce".
    """
    if name == "bce":
        return MultiLabelBCE(pos_weight=None if pos_weight is None else np.asarray(pos_weight).tolist())
    if name == "soft_f1":
        if pos_weight is not None:
            raise ValueError("pos_weight only applies to --loss=bce; soft_f1 already balances labels (macro average).")
        return MacroSoftF1()
    raise ValueError(f"Unknown loss {name!r}: choose one of {', '.join(LOSS_NAMES)}.")


def positive_weights(label_counts: Sequence[int], examples: int, max_weight: float = 100.0) -> np.ndarray:
    """Per-label weight of the positive term: negatives / positives, clipped to [1/max, max].

    A label with no positives gets ``max_weight`` (its term never fires anyway).
    """
    counts = np.asarray(label_counts, dtype=np.float64)
    if examples <= 0:
        raise ValueError(f"positive_weights needs examples > 0, got {examples}.")
    if np.any(counts < 0) or np.any(counts > examples):
        raise ValueError(f"label_counts must lie in [0, examples={examples}]; got {counts.tolist()}.")
    ratio = np.divide(examples - counts, counts, out=np.full_like(counts, max_weight), where=counts > 0)
    return np.clip(ratio, 1.0 / max_weight, max_weight).astype(np.float32)
