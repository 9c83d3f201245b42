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
from browser import load, screenshot
from dataset_factory import label_names, read_examples
from fault_server import FaultServer, Response

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


def _http_manifest(source: str, server, rows: int, relabel: dict[str, str] | None = None,
                   missing: frozenset[str] = frozenset()) -> list[list[str]]:
    """The first `rows` rows of a sample MovieGenre.csv with their posters served by `server` (with
    an ETag each); `relabel` changes genres by imdbId; ids in `missing` answer 404."""
    import csv

    with open(source, newline="") as f:
        header, *body = list(csv.reader(f))
    poster = header.index("Poster")
    out = [header]
    for row in body[:rows]:
        path = f"/posters/{row[0]}.jpg"
        if row[0] in missing:
            server.route(path, Response(status=404))
        else:
            image = (Path(source).parent / row[poster]).read_bytes()
            server.route(path, Response(body=image, content_type="image/jpeg", etag=f'"{row[0]}-1"'))
        row = list(row)
        row[poster] = server.url(path)
        row[header.index("Genre")] = (relabel or {}).get(row[0], row[header.index("Genre")])
        out.append(row)
    return out


def _write_csv(path: Path, rows: list[list[str]]) -> str:
    import csv

    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return str(path)


def _night_page(browser, workspace: Path, run_id: str, name: str) -> str:
    """The night's report.html as Chromium shows it (no console error, no request); returns its text."""
    problems, requests = load(browser, str(workspace / "runs" / run_id / "report.html"))
    assert problems == [] and requests == []
    screenshot(browser, name)
    return browser.find_element("tag name", "body").text


def test_a_night_costs_its_new_data_and_a_night_of_failing_fetches_stops_before_training(manifest, tmp_path, browser):
    server = FaultServer().start()
    workspace = tmp_path / "ws"
    try:
        night1 = _write_csv(tmp_path / "night1.csv", _http_manifest(manifest, server, 200))
        done = _retrain(workspace, night1, "--epochs", "8", "--allow_loopback")
        out, _ = done.communicate(timeout=600)
        assert done.returncode == 0, out
        assert server.statuses() == {200: 200}
        champion_bytes = (workspace / "champion.json").read_bytes()

        # Night 2: 10 % new rows and five relabelled ones: only the new images are downloaded.
        genres = {row[0]: row[4] for row in _http_manifest(manifest, server, 220)[1:]}
        relabel = {key: "Sneaker" if genres[key] != "Sneaker" else "Bag" for key in list(genres)[:5]}
        before = len(server.answers)
        night2 = _write_csv(tmp_path / "night2.csv", _http_manifest(manifest, server, 220, relabel))
        vocab = json.loads(champion_bytes)["labels_file"]
        done = _retrain(workspace, night2, "--epochs", "8", "--allow_loopback")
        out, _ = done.communicate(timeout=600)
        assert done.returncode == 0, out
        assert [status for _, status in server.answers[before:]] == [200] * 20
        record = _history(workspace)[-1]
        assert record["data"]["rows_reused"] == 200 and record["data"]["rows_fetched"] == 20, record
        assert record["health"]["passed"] and record["outcome"] in ("promoted", "refused")
        run_json = json.loads((workspace / "runs" / record["run_id"] / "model" / "run.json").read_text())
        assert run_json["timings"]["feature_extraction_images"] == 20  # the rest from the workspace's store
        data_dir = workspace / "runs" / record["run_id"] / "dataset"
        info = json.loads((data_dir / "dataset.json").read_text())
        labels_of = {k: label_names(e, info) for k, e in read_examples(str(data_dir), info).items()}
        assert {key: labels_of[key] for key in relabel} == {key: {label} for key, label in relabel.items()}
        # The same night as a full rebuild writes the same bytes.
        rebuilt = tmp_path / "rebuilt"
        done = _python_m("pipelines.preprocess", "--input", night2, "--output", str(rebuilt), "--vocab_file", vocab,
                         "--allow_loopback", *PREPROCESS_FLAGS)
        assert done.returncode == 0, done.stderr[-3000:]
        incremental = workspace / "runs" / record["run_id"] / "dataset"
        written = sorted(p.name for p in rebuilt.iterdir() if p.suffix == ".tfrecord" or p.name == "labels.txt")
        assert len(written) >= 4
        assert {n: (rebuilt / n).read_bytes() for n in written} == {n: (incremental / n).read_bytes() for n in written}
        champion_bytes = (workspace / "champion.json").read_bytes()

        # The night's page: champion and challenger per label on the same test rows, worse labels marked.
        comparison = json.loads((workspace / "runs" / record["run_id"] / "comparison.json").read_text())
        text = _night_page(browser, workspace, record["run_id"], "retrain-night.png")
        assert record["decision"]["reason"] in text and f"{record['decision']['test_examples']} test example(s)" in text
        rows = browser.find_elements("css selector", "table.comparison tbody tr")
        assert len(rows) == len(comparison["challenger"]) == 10
        for row in rows:
            cells = row.find_elements("tag name", "td")
            new, old = comparison["challenger"][cells[0].text], comparison["champion"][cells[0].text]
            assert cells[3].text == f"{new['ap']:.3f}" and cells[2].text == f"{old['ap']:.3f}"
            worse = new["ap"] < old["ap"] or new["f1"] < old["f1"]
            assert ("worse" in (row.get_attribute("class") or "")) == worse

        # Night 3: 40 % of the image URLs answer 404. Revalidation finds them; the gate stops the run.
        missing = frozenset(list(genres)[::5] + list(genres)[1::5])
        night3 = _write_csv(tmp_path / "night3.csv", _http_manifest(manifest, server, 220, relabel, missing))
        done = _retrain(workspace, night3, "--epochs", "8", "--allow_loopback", "--revalidate", "conditional")
        out, _ = done.communicate(timeout=600)
        assert done.returncode == 1, out
        record = _history(workspace)[-1]
        assert record["outcome"] == "failed" and "data health check failed" in record["reason"], record
        assert "rejected share 0.400" in record["reason"] and "--max_rejected_rise" in record["reason"]
        assert "fetch:http_404 88" in record["reason"]
        assert record["health"]["passed"] is False and record["data"]["rejected"] == 88
        assert not (workspace / "runs" / record["run_id"] / "model").exists()  # nothing trained
        assert (workspace / "champion.json").read_bytes() == champion_bytes
        text = _night_page(browser, workspace, record["run_id"], "retrain-night-refused.png")
        assert "The data-health gate refused this night" in text and "rejected share 0.400" in text
        assert "stopped at the data-health gate" in text

        # The index lists the three nights with their decisions, each linking its page.
        problems, requests = load(browser, str(workspace / "index.html"))
        assert problems == [] and requests == []
        rows = browser.find_elements("css selector", "tbody tr")
        assert [r.find_elements("tag name", "td")[1].text for r in rows][0] == "failed" and len(rows) == 3
        links = [a.get_attribute("href") for a in browser.find_elements("css selector", "tbody a")]
        assert len(links) == 3 and all(os.path.exists(link[len("file://"):]) for link in links)
    finally:
        server.stop()


def test_a_gs_workspace_reuses_its_newest_dataset(gcs_bucket, emulator_credentials, tmp_path):
    # The data steps on a gs:// workspace (the GCS emulator). TensorFlow's own file system cannot reach
    # an emulator, so the train step is tested on local workspaces only.
    import io

    import numpy as np
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from PIL import Image

    bucket = storage.Client(project="test-project", credentials=AnonymousCredentials()).bucket(gcs_bucket)
    rows = []
    for i in range(14):
        out = io.BytesIO()
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)).save(out, "JPEG")
        bucket.blob(f"images/{i}.jpg").upload_from_string(out.getvalue())
        rows.append(f"k{i},images/{i}.jpg,{'cat' if i % 2 else 'dog'}\n")
    workspace = f"gs://{gcs_bucket}/ws"
    common = ["--workspace", workspace, "--id_column", "key", "--image_size", "32"]
    for night, count in (("night1", 12), ("night2", 14)):
        bucket.blob(f"{night}.csv").upload_from_string("key,uri,labels\n" + "".join(rows[:count]))
        done = _python_m("pipelines.retrain", *common, "--run_id", night, "--step", "preprocess",
                         "--input", f"gs://{gcs_bucket}/{night}.csv")
        assert done.returncode == 0, done.stderr[-3000:]
        done = _python_m("pipelines.retrain", *common, "--run_id", night, "--step", "check")
        assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(bucket.blob("ws/runs/night2/dataset/dataset.json").download_as_bytes())
    assert (info["rows_reused"], info["rows_fetched"]) == (12, 2)
    assert info["reused_from"] == f"{workspace}/runs/night1/dataset"
    health = json.loads(bucket.blob("ws/runs/night2/health.json").download_as_bytes())
    assert health["passed"] and health["note"] == "no champion to compare with"
    steps = [(r["run_id"], r["step"], r["outcome"]) for r in
             map(json.loads, bucket.blob("ws/history.jsonl").download_as_text().splitlines())]
    assert steps == [(n, s, "step done") for n in ("night1", "night2") for s in ("preprocess", "check")]


def test_failed_step_exits_nonzero_and_is_recorded(tmp_path):
    workspace = tmp_path / "ws"
    code = retrain.main(["--workspace", str(workspace), "--input", str(tmp_path / "missing.csv")])
    assert code == 1
    record = _history(workspace)[-1]
    assert record["outcome"] == "failed"
    assert "preprocess" in record["reason"]
    assert not (workspace / "champion.json").exists()


# --- options: one declaration, forwarded ------------------------------------------------------------

PATHS = ("data_dir", "model_dir", "feature_store")  # where, not how: retrain's own folders


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
    recorded = json.loads((workspace / "runs" / run_id / "model" / "run.json").read_text())["flags"]
    assert recorded["feature_store"] == str(workspace / "features")
    assert scheduled["epochs"] is None and scheduled["early_stopping_patience"] is None  # the path's defaults


def test_every_training_option_reaches_the_challenger_through_retrain(manifest, tmp_path):
    from tagbeam.flags import declared
    from trainer.config import TrainOptions

    # Two runs, because --positive_weights and --loss soft_f1 exclude each other. Run "a" gives its
    # flags to the preprocess step only: the train step must run with what that step recorded (as
    # under Vertex AI Pipelines). Run "b" gives them to the train step itself.
    runs = {
        "a": {"backbone": "mobilenet_v2", "epochs": 1, "batch_size": 16,
              "learning_rate": 0.002, "hidden_units": 8, "dropout": 0.1, "positive_weights": True, "beta": 2.0,
              "seed": 5, "fine_tune_layers": 2, "fine_tune_learning_rate": 0.0002, "warm_start_epochs": 2,
              "augment": "flip", "cpu_replicas": 2, "early_stopping_patience": 3, "extraction_batch_size": 8},
        "b": {"loss": "soft_f1", "feature_cache": "off", "epochs": 1, "batch_size": 32, "seed": 1,
              "precision": "float32", "jit_compile": "off", "feature_store": str(tmp_path / "elsewhere")},
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
        recorded = json.loads((workspace / "runs" / run_id / "model" / "run.json").read_text())["flags"]
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
