"""Losses on logits: hand-computed values, and correct reduction under a 2-replica MirroredStrategy."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from trainer.losses import get_loss, positive_weights

Y = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=np.float32)
LOGITS = np.array([[2.0, -1.0, 0.5], [-0.5, -2.0, 1.5], [1.0, 0.3, -1.0], [-3.0, 2.5, 0.0]], dtype=np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))


def _numpy_bce(y: np.ndarray, z: np.ndarray, w: np.ndarray | float = 1.0) -> float:
    p = _sigmoid(z)
    return float(np.mean(-(w * y * np.log(p) + (1 - y) * np.log(1 - p))))


def _numpy_soft_f1_cost(y: np.ndarray, z: np.ndarray) -> float:
    p = _sigmoid(z)
    tp, fp, fn = (p * y).sum(0), (p * (1 - y)).sum(0), ((1 - p) * y).sum(0)
    return float(np.mean(1 - 2 * tp / (2 * tp + fp + fn)))


def test_bce_matches_hand_computed_value_and_keras():
    # One element by hand: y=1, z=2 -> -log(sigmoid(2)) = log(1 + e^-2) = 0.126928...
    single = get_loss("bce")(np.array([[1.0]]), np.array([[2.0]]))
    assert float(single) == pytest.approx(np.log1p(np.exp(-2.0)), rel=1e-6)
    value = float(get_loss("bce")(Y, LOGITS))
    assert value == pytest.approx(_numpy_bce(Y, LOGITS), rel=1e-6)
    keras = float(tf_keras.losses.BinaryCrossentropy(from_logits=True)(Y, LOGITS))
    assert value == pytest.approx(keras, rel=1e-5)


def test_bce_positive_weights_scale_only_the_positive_term():
    w = np.array([3.0, 0.5, 1.0], dtype=np.float32)
    value = float(get_loss("bce", pos_weight=w)(Y, LOGITS))
    assert value == pytest.approx(_numpy_bce(Y, LOGITS, w), rel=1e-6)
    # With all-negative targets the positive weights cannot matter.
    negatives = np.zeros_like(Y)
    assert float(get_loss("bce", pos_weight=w)(negatives, LOGITS)) == pytest.approx(_numpy_bce(negatives, LOGITS), rel=1e-6)


def test_soft_f1_matches_hand_computed_value():
    # Two examples, one label, probabilities 0.5 (logit 0) and sigmoid(ln 3) = 0.75; truths 1 and 0:
    # TP = 0.5, FP = 0.75, FN = 0.5 -> soft-F1 = 1 / (1 + 0.75 + 0.5) = 4/9, cost 5/9.
    cost = get_loss("soft_f1")(np.array([[1.0], [0.0]]), np.array([[0.0], [np.log(3.0)]]))
    assert float(cost) == pytest.approx(5 / 9, rel=1e-5)
    assert float(get_loss("soft_f1")(Y, LOGITS)) == pytest.approx(_numpy_soft_f1_cost(Y, LOGITS), rel=1e-5)
    # Confident and right on every label: cost near 0; confident and wrong: near 1.
    assert float(get_loss("soft_f1")(Y, 20 * (2 * Y - 1))) < 1e-6
    assert float(get_loss("soft_f1")(Y, -20 * (2 * Y - 1))) > 1 - 1e-6


def test_positive_weights_are_clipped_negative_to_positive_ratios():
    # 100 positives of 100 -> ratio 0 and 99 -> 1/99: both clipped up to 1/max_weight.
    weights = positive_weights([10, 50, 0, 100, 99], examples=100, max_weight=50.0)
    np.testing.assert_allclose(weights, [9.0, 1.0, 50.0, 1 / 50, 1 / 50], rtol=1e-6)
    with pytest.raises(ValueError, match="label_counts"):
        positive_weights([101], examples=100)


def test_get_loss_rejects_unknown_names_and_misplaced_weights():
    with pytest.raises(ValueError, match="Unknown loss 'focal'"):
        get_loss("focal")
    with pytest.raises(ValueError, match="pos_weight only applies"):
        get_loss("soft_f1", pos_weight=np.ones(3))


def _strategy() -> tf.distribute.MirroredStrategy:
    # Every MirroredStrategy numbers its collective ops from the same keys, so two strategies whose
    # all-reduces differ in shape abort each other in one process ("Shape mismatch in the collective
    # instance 100", tensorflow#62790). ReductionToOneDevice issues no collectives, so these tests
    # cannot collide with other test files' strategies; the loss code is the same either way.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
    assert strategy.num_replicas_in_sync == 2
    return strategy


def test_soft_f1_gradient_under_two_replicas_equals_global_batch_gradient():
    """Per-replica soft-F1 would differ from the global one; the all-reduce makes them equal."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    y = (rng.random((8, 3)) < 0.4).astype(np.float32)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    loss = get_loss("soft_f1")

    w = tf.Variable(w0)
    with tf.GradientTape() as tape:
        expected_value = loss(y, x @ w)
    expected_grad = tape.gradient(expected_value, w).numpy()

    strategy = _strategy()
    with strategy.scope():
        w_mirrored = tf.Variable(w0)
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))

    @tf.function
    def step(batch):
        def replica_fn(xb, yb):
            with tf.GradientTape() as tape:
                # Keras' scaling of a replica's loss under distribution (`call`: a custom loop
                # may not use the default reduction, see tf_keras.losses.Loss).
                scaled = loss.call(yb, xb @ w_mirrored) / strategy.num_replicas_in_sync
            return scaled, tape.gradient(scaled, w_mirrored)

        scaled, grad = strategy.run(replica_fn, args=batch)
        return (strategy.reduce("SUM", scaled, axis=None), strategy.reduce("SUM", grad, axis=None))

    value, grad = step(next(iter(dataset)))
    assert float(value) == pytest.approx(float(expected_value), rel=1e-5)
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-4, atol=1e-6)
    # The per-replica (un-reduced) cost really is different, so the test can tell them apart.
    halves = [_numpy_soft_f1_cost(y[i : i + 4], x[i : i + 4] @ w0) for i in (0, 4)]
    assert abs(np.mean(halves) - float(expected_value)) > 1e-3


@pytest.mark.parametrize("name", ["bce", "soft_f1"])
def test_losses_train_and_evaluate_exactly_in_a_two_replica_fit(name):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = (x[:, :3] + 0.3 * rng.normal(size=(64, 3)) > 0.2).astype(np.float32)
    with _strategy().scope():
        tf_keras.utils.set_random_seed(0)
        model = tf_keras.Sequential([tf_keras.Input([6]), tf_keras.layers.Dense(3)])
        pos_weight = positive_weights(y.sum(0).astype(int), len(y)) if name == "bce" else None
        model.compile(optimizer=tf_keras.optimizers.Adam(0.05), loss=get_loss(name, pos_weight))
        history = model.fit(x, y, batch_size=16, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses
    # One global batch split over the 2 replicas: the reported loss must equal the loss of the whole batch.
    logits = model.predict(x, batch_size=64, verbose=0)
    expected = _numpy_bce(y, logits, pos_weight) if name == "bce" else _numpy_soft_f1_cost(y, logits)
    assert model.evaluate(x, y, batch_size=64, verbose=0) == pytest.approx(expected, rel=1e-4)


_COLLECTIVE_FIT = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import tf_keras
from trainer.losses import get_loss
from trainer.metrics import training_metrics

rng = np.random.default_rng(1)
x = rng.normal(size=(64, 6)).astype(np.float32)
y = (x[:, :3] + 0.3 * rng.normal(size=(64, 3)) > 0.2).astype(np.float32)
strategy = tf.distribute.MirroredStrategy()  # the default: collective all-reduce, as in training
with strategy.scope():
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([tf_keras.Input([6]), tf_keras.layers.Dense(3)])
    model.compile(optimizer=tf_keras.optimizers.Adam(0.05), loss=get_loss("soft_f1"), metrics=training_metrics(3))
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0)
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "cross_device_ops": type(strategy.extended._cross_device_ops).__name__,
    "losses": history.history["loss"],
    "evaluated": model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)["loss"],
    "logits": model.predict(x, batch_size=64, verbose=0).tolist(),
}))
"""


def test_soft_f1_trains_under_the_default_collective_strategy_in_a_fresh_process():
    """Training uses MirroredStrategy() with collective all-reduce, which tests in this process
    cannot (see _strategy); a fresh process with one strategy is exactly the training set-up."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-c", _COLLECTIVE_FIT], env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2 and result["cross_device_ops"] == "CollectiveAllReduce", result
    assert result["losses"][-1] < result["losses"][0] - 0.05, result["losses"]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = (x[:, :3] + 0.3 * rng.normal(size=(64, 3)) > 0.2).astype(np.float32)
    assert result["evaluated"] == pytest.approx(_numpy_soft_f1_cost(y, np.array(result["logits"])), rel=1e-4)
