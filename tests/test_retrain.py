"""Scheduled retraining: promotion gate, atomic champion, killed runs, on real sample posters."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import retrain, sample_data

# Small but real: 10 Fashion-MNIST labels, 96 px images, a few epochs on cached features.
PREPROCESS_FLAGS = ["--image_size", "96", "--val_fraction", "0.2", "--test_fraction", "0.25"]
TRAIN_FLAGS = ["--batch_size", "32", "--cpu_replicas", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("samples")
    sample_data.build(root, posters=320, heldout_posters=0, chips=False)
    return str(root / "posters" / "MovieGenre.csv")


def _retrain(workspace: Path, manifest: str, *flags: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pipelines.retrain", "--workspace", str(workspace), "--input", manifest,
            "--min_metric", "0.3", "--tolerance", "0.02", *TRAIN_FLAGS, *flags, *PREPROCESS_FLAGS]
    # Its own process group, so a kill takes the preprocess/trainer children down with it.
    return subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _history(workspace: Path) -> list[dict]:
    return [json.loads(line) for line in (workspace / "history.jsonl").read_text().splitlines()]


def test_decide_rule():
    assert retrain.decide(0.5, None, 0.01, 0.3)[0]
    assert not retrain.decide(0.2, None, 0.01, 0.3)[0]
    assert retrain.decide(0.795, 0.80, 0.01, 0.3)[0]
    assert not retrain.decide(0.78, 0.80, 0.01, 0.3)[0]
    assert "tolerance" in retrain.decide(0.78, 0.80, 0.01, 0.3)[1]


def test_promote_refuse_and_survive_a_kill(manifest, tmp_path):
    workspace = tmp_path / "ws"

    first = _retrain(workspace, manifest, "--epochs", "15", "--learning_rate", "0.003")
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    champion_file = workspace / "champion.json"
    champion = json.loads(champion_file.read_text())
    record = _history(workspace)[-1]
    assert record["outcome"] == "promoted", record
    assert record["decision"]["champion"] is None
    assert record["decision"]["challenger"]["value"] >= 0.3
    assert record["data"]["input_rows"] == 320
    champion_bytes = champion_file.read_bytes()

    # A run killed while its challenger trains leaves the champion exactly as it was.
    killed = _retrain(workspace, manifest, "--epochs", "200")
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None:
        if any((run / "model").exists() for run in (workspace / "runs").iterdir() if run.name != champion["run_id"]):
            break
        time.sleep(0.5)
    assert killed.poll() is None, killed.communicate()[0]
    time.sleep(3)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert champion_file.read_bytes() == champion_bytes
    assert len(_history(workspace)) == 1

    # The next run works, and a deliberately worse challenger is refused.
    worse = _retrain(workspace, manifest, "--epochs", "1", "--learning_rate", "1e-6")
    out, _ = worse.communicate(timeout=600)
    assert worse.returncode == 0, out
    record = _history(workspace)[-1]
    assert record["outcome"] == "refused", record
    assert record["decision"]["champion"]["run_id"] == champion["run_id"]
    assert record["decision"]["challenger"]["value"] < record["decision"]["champion"]["value"] - 0.02
    assert champion_file.read_bytes() == champion_bytes
    # Label order was carried over from the champion's vocabulary.
    new_run = workspace / "runs" / record["run_id"]
    assert (new_run / "dataset" / "labels.txt").read_text() == Path(champion["labels_file"]).read_text()
    # Both models were scored on the same test split.
    assert record["decision"]["test_examples"] > 0


def test_failed_step_exits_nonzero_and_is_recorded(tmp_path):
    workspace = tmp_path / "ws"
    code = retrain.main(["--workspace", str(workspace), "--input", str(tmp_path / "missing.csv")])
    assert code == 1
    record = _history(workspace)[-1]
    assert record["outcome"] == "failed"
    assert "preprocess" in record["reason"]
    assert not (workspace / "champion.json").exists()
