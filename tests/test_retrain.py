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

import sample_data
from pipelines import retrain

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


# --- options: one declaration, forwarded ------------------------------------------------------------

PATHS = ("data_dir", "model_dir")


def _python_m(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=900, env=env)


def _flags(model_dir: Path) -> dict:
    return {k: v for k, v in json.loads((model_dir / "run.json").read_text())["flags"].items() if k not in PATHS}


def test_a_scheduled_challenger_trains_exactly_as_the_trainer_does_by_default(manifest, tmp_path):
    # No training flag: the challenger must get trainer.task's own defaults (once it got 30 epochs
    # from retrain's copy of --epochs while the trainer's default was 300).
    workspace = tmp_path / "ws"
    done = _python_m("pipelines.retrain", "--workspace", str(workspace), "--input", manifest, *PREPROCESS_FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_id,) = [p.name for p in (workspace / "runs").iterdir()]
    direct = _python_m("trainer.task", "--data_dir", str(workspace / "runs" / run_id / "dataset"),
                       "--model_dir", str(tmp_path / "direct"))
    assert direct.returncode == 0, direct.stderr[-3000:]
    scheduled = _flags(workspace / "runs" / run_id / "model")
    assert scheduled == _flags(tmp_path / "direct")
    assert scheduled["epochs"] is None and scheduled["early_stopping_patience"] is None  # the path's defaults


def test_every_training_option_reaches_the_challenger_through_retrain(manifest, tmp_path):
    from tagbeam.flags import declared
    from trainer import embedded_backbone
    from trainer.config import TrainOptions

    # Two runs, because --positive_weights and --loss soft_f1 exclude each other. Run "a" gives its
    # flags to the preprocess step only: the train step must run with what that step recorded (as
    # under Vertex AI Pipelines). Run "b" gives them to the train step itself.
    runs = {
        "a": {"hub_handle": embedded_backbone.default_handle(), "epochs": 1, "batch_size": 16,
              "learning_rate": 0.002, "hidden_units": 8, "dropout": 0.1, "positive_weights": True, "beta": 2.0,
              "seed": 5, "fine_tune_layers": 2, "fine_tune_learning_rate": 0.0002, "warm_start_epochs": 2,
              "augment": "flip", "cpu_replicas": 2, "early_stopping_patience": 3, "extraction_batch_size": 8},
        "b": {"loss": "soft_f1", "feature_cache": "off", "epochs": 1, "batch_size": 32, "seed": 1,
              "precision": "float32", "jit_compile": "off"},
    }
    options = {o.flag: o for o in declared(TrainOptions)}
    assert set(runs["a"]) | set(runs["b"]) == set(options), "a new training option must be added to this test"
    workspace = tmp_path / "ws"
    for run_id, values in runs.items():
        argv = []
        for flag, value in values.items():
            assert value != options[flag].default, flag
            argv += [f"--{flag}"] if value is True else [f"--{flag}", str(value)]
        common = ["pipelines.retrain", "--workspace", str(workspace), "--run_id", run_id]
        first = [*common, "--step", "preprocess", "--input", manifest, *PREPROCESS_FLAGS]
        done = _python_m(*first, *argv) if run_id == "a" else _python_m(*first)
        assert done.returncode == 0, done.stderr[-3000:]
        done = _python_m(*common, "--step", "train") if run_id == "a" else _python_m(*common, "--step", "train", *argv)
        assert done.returncode == 0, done.stderr[-3000:]
        recorded = _flags(workspace / "runs" / run_id / "model")
        assert {flag: recorded[flag] for flag in values} == values


@pytest.mark.parametrize("entry_point", ["pipelines.retrain", "pipelines.preprocess", "pipelines.predict",
                                         "trainer.task"])
def test_an_option_no_step_knows_is_refused(entry_point, tmp_path, capsys):
    import importlib

    argv = {"pipelines.retrain": ["--workspace", str(tmp_path)],
            "pipelines.preprocess": ["--input", "m.csv", "--output", str(tmp_path)],
            "pipelines.predict": ["--input", "m.csv", "--output", str(tmp_path), "--model", str(tmp_path)],
            "trainer.task": ["--data_dir", str(tmp_path), "--model_dir", str(tmp_path)]}[entry_point]
    code = importlib.import_module(entry_point).main([*argv, "--dropuot", "0.1", "--runner", "DirectRunner"])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "--dropuot 0.1" in line
    assert "--runner" not in line or entry_point == "trainer.task"  # a Beam option is fine where Beam runs
    assert not (tmp_path / "runs").exists() and not (tmp_path / "history.jsonl").exists()
