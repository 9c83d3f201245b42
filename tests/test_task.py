"""python -m trainer.task end to end: 2 replicas, the cached-feature path, resume, clear errors.

In-process runs get 2 replicas from conftest.py's CPU split; subprocess runs split the CPU
themselves with --cpu_replicas 2.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from tagbeam import dataset
from tagbeam.export import read_backbone
from trainer import data, task
from trainer import model as model_lib
from trainer.config import CACHED, THROUGH_BACKBONE, TrainOptions
from trainer.evaluation import evaluate
from trainer.serving import preprocess_image_bytes
from trainer.train import OutputDirs, train

from backbone_factory import write_backbone
from dataset_factory import write_dataset
from job_runs import train as run_trainer

LABELS = ["circle", "square", "triangle", "cross"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_backbone(str(tmp_path_factory.mktemp("backbone") / "tiny"))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("data") / "ds")
    return write_dataset(root, {"train": 96, "val": 32, "test": 32}, 32, LABELS, seed=11)


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _test_image_bytes(info: dataset.DatasetInfo, count: int) -> list[bytes]:
    spec = {"image": tf.io.FixedLenFeature([], tf.string)}
    records = tf.data.TFRecordDataset(list(info.shard_paths("test")), info.compression_type).take(count)
    return [tf.io.parse_single_example(r, spec)["image"].numpy() for r in records]


# Runs in a fresh interpreter that cannot import the project (nor tensorflow_hub / Keras): the
# export must serve with TensorFlow alone, as TF Serving or Vertex AI would load it.
_SERVE_SCRIPT = textwrap.dedent("""
    import sys
    for blocked in ("trainer", "pipelines", "tensorflow_hub", "tf_keras", "keras"):
        sys.modules[blocked] = None
    import numpy as np
    import tensorflow as tf
    export, images, out = sys.argv[1:]
    payload = [open(f"{images}/{name}", "rb").read() for name in sorted(__import__("os").listdir(images))]
    serve = tf.saved_model.load(export).signatures["serving_default"]
    np.save(out, serve(image_bytes=tf.constant(payload))["probabilities"].numpy())
""")


def test_end_to_end_on_two_replicas_with_the_embedded_backbone(tmp_path) -> None:
    root = write_dataset(str(tmp_path / "ds"), {"train": 128, "val": 48, "test": 40}, 64, LABELS, seed=5)
    model_dir = str(tmp_path / "model")
    args = task.parse_args([
        "--data_dir", root, "--model_dir", model_dir, "--epochs", "6", "--batch_size", "32",
        "--learning_rate", "0.01", "--seed", "1", "--cpu_replicas", "2", "--version", "7",
    ])
    outcome = task.run(*args)  # --backbone omitted: the default embedded backbone

    run_info = json.load(open(os.path.join(model_dir, "run.json")))
    assert run_info["num_replicas_in_sync"] == 2 and len(run_info["devices"]) == 2
    assert run_info["training_path"] == CACHED and run_info["backbone"]["info"]["output_dim"] == 1280
    assert run_info["export_path"] == os.path.join(model_dir, "export", "7")
    # Which backbone: named in run.json and in the export itself (the backbone.json asset).
    assert run_info["backbone"]["name"] == run_info["flags"]["backbone"] == TrainOptions().backbone
    assert run_info["backbone"]["info"]["backbone"] == TrainOptions().backbone
    assert read_backbone(run_info["export_path"]) == run_info["backbone"]
    metrics = json.load(open(os.path.join(model_dir, "metrics.json")))
    assert metrics["examples"] == 40 and metrics["num_labels"] == 4
    assert set(metrics["per_label"]) == set(LABELS)
    # Frozen ImageNet features separate coloured shapes easily: far above chance (about 0.5 here).
    assert 0.75 < metrics["at_tuned"]["macro_f1"] <= 1.0 and 0.0 <= metrics["at_tuned"]["hamming_loss"] < 0.2
    assert run_info["test_macro_f1_tuned"] == metrics["at_tuned"]["macro_f1"]
    history = json.load(open(os.path.join(model_dir, "history.json")))
    assert len(history["loss"]) == 6 and history["val_loss"][-1] < history["val_loss"][0]
    thresholds = json.load(open(os.path.join(model_dir, "thresholds.json")))["thresholds"]
    assert list(thresholds) == LABELS and all(0.0 < t < 1.0 for t in thresholds.values())
    assert open(os.path.join(model_dir, "labels.txt")).read().split() == LABELS
    for name in ("samples.png", "per_label_f1.png", "learning_curves.png"):
        assert os.path.getsize(os.path.join(model_dir, name)) > 1000

    info = dataset.read(root)
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    payload = _test_image_bytes(info, 8)
    for i, encoded in enumerate(payload):
        (images_dir / f"{i:02d}.jpg").write_bytes(encoded)
    # The export re-encodes at the dataset's JPEG quality (as the stored training images were).
    pixels = preprocess_image_bytes(tf.constant(payload), info.stored_images)
    in_memory = tf.sigmoid(outcome.result.model(pixels)).numpy()
    out = tmp_path / "served.npy"
    subprocess.run(
        [sys.executable, "-I", "-c", _SERVE_SCRIPT, outcome.export_path, str(images_dir), str(out)],
        cwd=tmp_path, env=_subprocess_env(), check=True, timeout=120, capture_output=True,
    )
    served = np.load(out)
    assert served.shape == (8, 4)
    np.testing.assert_allclose(served, in_memory, atol=1e-5)


def test_cached_features_train_like_the_full_backbone(tiny_backbone, tmp_path) -> None:
    # One train shard: the shard-order shuffle of the image path is then the identity, so both
    # paths see the examples in the same seeded order.
    root = write_dataset(str(tmp_path / "ds"), {"train": 100, "val": 40}, 32, LABELS, seed=3, shards=1)
    info = dataset.read(root)
    strategy = model_lib.setup_strategy(2)
    with strategy.scope():
        backbone = model_lib.load_backbone(tiny_backbone)
    results = {}
    for mode in ("auto", "off"):
        config = TrainOptions(epochs=10, batch_size=16, learning_rate=0.02, hidden_units=16, dropout=0.0,
                              seed=9, early_stopping_patience=10, feature_cache=mode)
        results[mode] = train(strategy, info, backbone, config, OutputDirs.under(str(tmp_path / mode)))
    cached, full = results["auto"], results["off"]
    assert (cached.path, full.path) == (CACHED, THROUGH_BACKBONE)
    # Same seeded order, same weights, same features: the curves agree, not just the end point.
    np.testing.assert_allclose(cached.history["loss"], full.history["loss"], atol=1e-4)
    np.testing.assert_allclose(cached.history["val_macro_f1"], full.history["val_macro_f1"], atol=0.01)
    f1 = {}
    for mode, result in results.items():
        probs, truth = result.predict("val")
        f1[mode] = evaluate(truth, probs, LABELS, np.full(4, 0.5))["at_default"]["macro_f1"]
    assert f1["auto"] > 0.5  # learned something, so the comparison means something
    assert abs(f1["auto"] - f1["off"]) <= 0.01
    # The assembled model (backbone + the head trained on cached features) gives the same probabilities.
    images, _ = next(iter(data.image_dataset(info, "val", 40)))
    np.testing.assert_allclose(tf.sigmoid(cached.model(images)).numpy(), cached.predict("val")[0], atol=1e-5)


def test_fine_tuning_starts_from_a_head_trained_on_cached_features(tiny_backbone, small_dataset, tmp_path) -> None:
    info = dataset.read(small_dataset)
    strategy = model_lib.setup_strategy(2)
    results = {}
    for mode in ("auto", "off"):  # "off": no feature cache, so no warm start either
        with strategy.scope():
            backbone = model_lib.load_backbone(tiny_backbone, trainable=True)
        config = TrainOptions(epochs=1, batch_size=16, learning_rate=0.01, seed=4, fine_tune_layers=2,
                              early_stopping_patience=4, feature_cache=mode, warm_start_epochs=30)
        results[mode] = train(strategy, info, backbone, config, OutputDirs.under(str(tmp_path / mode)))
    warm, cold = results["auto"], results["off"]
    assert warm.path == cold.path == THROUGH_BACKBONE
    assert "warm_start_s" in warm.timings and "warm_start_s" not in cold.timings
    assert os.listdir(tmp_path / "auto" / "feature_cache") and not os.path.exists(tmp_path / "off" / "feature_cache")
    # The head arrives trained: its first fine-tuning epoch starts far below a random head's.
    assert warm.history["val_loss"][0] < 0.8 * cold.history["val_loss"][0]


def _history_rows(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return max(0, len(f.read().splitlines()) - 1)


def test_killed_training_resumes_from_its_backup(tiny_backbone, small_dataset, tmp_path) -> None:
    model_dir = str(tmp_path / "model")
    epochs = 12
    command = [sys.executable, "-m", "trainer.task", "--data_dir", small_dataset, "--model_dir", model_dir,
               "--hub_handle", tiny_backbone, "--epochs", str(epochs), "--batch_size", "16", "--seed", "2",
               "--early_stopping_patience", "50", "--cpu_replicas", "2"]
    history_csv = os.path.join(model_dir, "history.csv")
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=REPO, env=_subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 150
        # Two logged epochs: the backup of the first is then surely written (it precedes epoch 2).
        while _history_rows(history_csv) < 2 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    logged_before_kill = _history_rows(history_csv)
    assert 2 <= logged_before_kill < epochs

    second = subprocess.run(command, cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=240)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    run_info = json.load(open(os.path.join(model_dir, "run.json")))
    resumed_at = run_info["initial_epoch"]
    assert 1 <= resumed_at <= logged_before_kill
    assert f"continuing at epoch {resumed_at + 1}" in output and "Epoch 1/12" not in output
    assert f"epoch {resumed_at + 1}/{epochs}:" in output
    assert "reusing cached features" in output  # the restart skipped feature extraction
    history = json.load(open(os.path.join(model_dir, "history.json")))
    assert len(history["loss"]) == epochs == run_info["epochs_completed"]
    assert not os.path.exists(os.path.join(model_dir, "backup", "chief"))  # removed once training finished


def test_data_dir_without_dataset_json_fails_with_one_error_line(tmp_path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "trainer.task", "--data_dir", str(tmp_path), "--model_dir", str(tmp_path / "m")],
        cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no dataset.json" in errors[0] and "python -m pipelines.preprocess" in errors[0]


def test_image_size_mismatch_with_a_fixed_size_backbone(small_dataset, tmp_path, capsys) -> None:
    fixed = write_backbone(str(tmp_path / "fixed48"), input_size=48)
    code = task.main(["--data_dir", small_dataset, "--model_dir", str(tmp_path / "m"), "--backbone", fixed])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: --backbone {fixed} takes 48x48 images but the dataset holds 32x32" in err


def test_unreachable_hub_handle(small_dataset, tmp_path, capsys, outbound_expected) -> None:
    # --hub_handle: the option's older name, still taken (commands and workspaces written before --backbone).
    handle = "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5"
    start = time.monotonic()
    code = task.main(["--data_dir", small_dataset, "--model_dir", str(tmp_path / "m"), "--hub_handle", handle])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 30
    assert f"error: --backbone {handle} cannot be loaded" in err and "embedded backbone (mobilenet_v2" in err


def test_empty_train_split(tmp_path, capsys) -> None:
    root = write_dataset(str(tmp_path / "ds"), {"train": 0, "val": 4}, 16, LABELS, seed=1)
    assert task.main(["--data_dir", root, "--model_dir", str(tmp_path / "m")]) == 2
    assert "error: the train split of" in capsys.readouterr().err


def test_empty_val_and_test_splits_degrade_with_warnings_under_vertex_variables(
    tiny_backbone, tmp_path, caplog, monkeypatch
) -> None:
    root = write_dataset(str(tmp_path / "ds"), {"train": 48, "val": 0, "test": 0}, 32, LABELS, seed=4)
    model_dir = str(tmp_path / "model")
    # Vertex AI passes the output folders through the environment, not flags.
    monkeypatch.setenv("AIP_MODEL_DIR", model_dir)
    monkeypatch.setenv("AIP_CHECKPOINT_DIR", str(tmp_path / "vertex_checkpoints"))
    monkeypatch.setenv("AIP_TENSORBOARD_LOG_DIR", str(tmp_path / "vertex_logs"))
    with caplog.at_level(logging.WARNING, logger="trainer"):
        outcome = run_trainer([
            "--data_dir", root, "--hub_handle", tiny_backbone, "--epochs", "2", "--batch_size", "16", "--seed", "0",
        ])
    assert outcome.run_info["thresholds_tuned_on"] == "train" and outcome.metrics is None
    assert "thresholds are tuned on the TRAIN split" in caplog.text and "skipping test evaluation" in caplog.text
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))
    assert outcome.export_path.startswith(model_dir)
    assert os.path.exists(os.path.join(outcome.export_path, "saved_model.pb"))
    assert len(json.load(open(os.path.join(model_dir, "history.json")))["loss"]) == 2
    assert os.path.exists(tmp_path / "vertex_checkpoints" / "best.index")
    assert os.listdir(tmp_path / "vertex_logs") and not os.path.exists(os.path.join(model_dir, "logs"))


def test_a_corrupt_shard_is_named_with_what_to_do(tiny_backbone, tmp_path, capsys) -> None:
    root = write_dataset(str(tmp_path / "ds"), {"train": 40, "val": 8}, 32, LABELS, seed=5, shards=2)
    shard = dataset.read(root).shard_paths("train")[1]
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2: len(data) // 2 + 16] = b"\xff" * 16  # flipped bytes inside a record
    open(shard, "wb").write(bytes(data))
    code = task.main(["--data_dir", root, "--model_dir", str(tmp_path / "m"), "--hub_handle", tiny_backbone,
                      "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"corrupt shard(s) ({shard})" in line and "rerun `python -m pipelines.preprocess`" in line


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_fine_tunes_on_cpu_and_exports_float32(precision, tiny_backbone, small_dataset, tmp_path) -> None:
    import tf_keras

    model_dir = str(tmp_path / "model")
    try:
        # A hidden layer (16-bit under the policy) and fine-tuning: the warm start on cached features,
        # then backbone + head with both optimizers, loss-scaled under mixed_float16.
        outcome = run_trainer([
            "--data_dir", small_dataset, "--model_dir", model_dir, "--hub_handle", tiny_backbone, "--seed", "3",
            "--precision", precision, "--hidden_units", "8", "--fine_tune_layers", "2", "--epochs", "2",
            "--warm_start_epochs", "3", "--batch_size", "16", "--learning_rate", "0.01",
        ])
        model = outcome.result.model
        assert tf_keras.mixed_precision.global_policy().name == precision
        hidden = model.get_layer("head").get_layer("hidden")
        assert hidden.compute_dtype == precision.split("_")[1] and hidden.kernel.dtype == tf.float32
        scaled = isinstance(model.optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
        assert scaled == (precision == "mixed_float16")
    finally:
        model_lib.set_precision("float32")  # the policy is global: later tests build float32 models
    history = json.load(open(os.path.join(model_dir, "history.json")))
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))
    assert outcome.metrics is not None and 0.0 <= outcome.metrics["at_tuned"]["macro_f1"] <= 1.0
    serve = tf.saved_model.load(outcome.export_path).signatures["serving_default"]
    assert serve.structured_outputs["probabilities"].dtype == tf.float32
    payload = _test_image_bytes(dataset.read(small_dataset), 4)
    probabilities = serve(image_bytes=tf.constant(payload))["probabilities"]
    assert probabilities.dtype == tf.float32 and probabilities.shape == (4, len(LABELS))
    assert np.all(np.isfinite(probabilities.numpy()))


def test_xla_trains_and_serves_on_one_cpu_replica_and_is_refused_on_several(tiny_backbone, small_dataset, tmp_path) -> None:
    # A fresh process: one replica (no CPU split). Warm start (XLA extraction and head fit) and
    # fine-tuning (XLA train step through the backbone).
    model_dir = str(tmp_path / "model")
    command = [sys.executable, "-m", "trainer.task", "--data_dir", small_dataset, "--hub_handle", tiny_backbone,
               "--seed", "3", "--jit_compile", "on", "--fine_tune_layers", "2", "--epochs", "2",
               "--warm_start_epochs", "2", "--batch_size", "16"]
    done = subprocess.run([*command, "--model_dir", model_dir], cwd=REPO, env=_subprocess_env(), capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "XLA on" in done.stderr and os.path.exists(os.path.join(model_dir, "metrics.json"))
    refused = subprocess.run([*command, "--model_dir", str(tmp_path / "m2"), "--cpu_replicas", "2"], cwd=REPO,
                             env=_subprocess_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "--jit_compile on: XLA cannot run MirroredStrategy over logical CPU devices" in line
