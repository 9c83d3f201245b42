"""Scheduled retraining: promotion gate, atomic champion, killed runs, on real sample posters."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sample_data
from pipelines import retrain

from browser import load, screenshot
from dataset_factory import label_names, read_examples
from fault_server import FaultServer, Response
from image_factory import noise_image
from job_runs import python_m as _python_m

# Small but real: 10 Fashion-MNIST labels, 96 px images, a few epochs on cached features.
PREPROCESS_FLAGS = ["--image_size", "96", "--val_fraction", "0.2", "--test_fraction", "0.25"]
TRAIN_FLAGS = ["--batch_size", "32", "--cpu_replicas", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("samples")
    sample_data.build(root, posters=320, heldout_posters=0, chips=False)
    return str(root / "posters" / "MovieGenre.csv")


@pytest.fixture(scope="module")
def prepared(manifest, tmp_path_factory) -> Path:
    """A workspace whose run "base" has done its preprocess step on the sample posters: the tests that
    only need a dataset to train on start from a copy of it (`_copy`) instead of preprocessing again."""
    workspace = tmp_path_factory.mktemp("prepared") / "ws"
    done = _python_m("pipelines.retrain", "--workspace", str(workspace), "--run_id", "base", "--step", "preprocess",
                     "--input", manifest, *PREPROCESS_FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    return workspace


def _copy(prepared: Path, tmp_path: Path, run_id: str) -> Path:
    """A workspace of this test's own, holding the prepared run as `run_id` (a later step's own flags,
    --workspace and --run_id included, override those the preprocess step recorded)."""
    workspace = tmp_path / "ws"
    shutil.copytree(prepared, workspace)
    (workspace / "runs" / "base").rename(workspace / "runs" / run_id)
    return workspace


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
    # It held the workspace when it was killed, and could not give the lease back.
    killed_run = json.loads((workspace / "workspace.lease").read_text())["run_id"]
    assert killed_run != champion["run_id"]

    # The next run takes the dead run's lease over (and says so), and a deliberately worse
    # challenger is refused.
    worse = _retrain(workspace, manifest, "--epochs", "1", "--learning_rate", "1e-6")
    out, _ = worse.communicate(timeout=600)
    assert worse.returncode == 0, out
    assert f"took over the workspace lease {workspace / 'workspace.lease'} from run {killed_run}" in out
    assert "is gone" in out
    assert not (workspace / "workspace.lease").exists()
    record = _history(workspace)[-1]
    assert record["took_over_from"] == killed_run
    assert record["outcome"] == "refused", record
    assert record["decision"]["champion"]["run_id"] == champion["run_id"]
    assert record["decision"]["challenger"]["value"] < record["decision"]["champion"]["value"] - 0.02
    assert champion_file.read_bytes() == champion_bytes
    # Label order was carried over from the champion's vocabulary.
    new_run = workspace / "runs" / record["run_id"]
    assert (new_run / "dataset" / "labels.txt").read_text() == (workspace / champion["labels_file"]).read_text()
    # Both models were scored on the same test split.
    assert record["decision"]["test_examples"] > 0


def test_two_retrains_started_together_promote_what_the_gate_prefers(manifest, tmp_path):
    # A good and a deliberately poor challenger start at the same moment on a fresh workspace and
    # wait for each other; a third run started meanwhile (the default, --if_held skip) only records
    # that it was skipped. Whichever order they get the workspace in, the good one is the champion.
    workspace = tmp_path / "ws"
    good = _retrain(workspace, manifest, "--run_id", "good", "--if_held", "wait", "--epochs", "8",
                    "--learning_rate", "0.003")
    poor = _retrain(workspace, manifest, "--run_id", "poor", "--if_held", "wait", "--epochs", "1",
                    "--learning_rate", "1e-6")
    lease_file = workspace / "workspace.lease"
    deadline = time.time() + 120
    while not lease_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    skipped = _retrain(workspace, manifest, "--run_id", "cron")
    out, _ = skipped.communicate(timeout=300)
    assert skipped.returncode == 0, out
    assert "skipped: the workspace is held by run " in out
    outs = {}
    for name, proc in (("good", good), ("poor", poor)):
        outs[name], _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, outs[name]
    records = {r["run_id"]: r for r in _history(workspace)}
    assert set(records) == {"good", "poor", "cron"} and len(_history(workspace)) == 3
    assert records["cron"]["outcome"] == "skipped" and records["cron"]["held_by"] in ("good", "poor")
    assert "decision" not in records["cron"] and not (workspace / "runs" / "cron").exists()
    first, second = (r for r in _history(workspace) if r["run_id"] != "cron")
    assert "waited_s" in second and "waiting" in outs[second["run_id"]]
    # One decision per comparison; the later run compared with what the earlier one left.
    assert first["champion_before"] is None and first["decision"]["champion"] is None
    first_champion = first["run_id"] if first["outcome"] == "promoted" else None
    assert second["champion_before"] == first_champion
    assert (second["decision"]["champion"] or {}).get("run_id") == first_champion
    assert first["decision"]["comparisons"] == second["decision"]["comparisons"] == 1
    assert records["good"]["outcome"] == "promoted"
    if first["run_id"] == "good":  # poor first: with no champion yet, it may clear the floor and be promoted
        assert records["poor"]["outcome"] == "refused"
        assert second["decision"]["challenger"]["value"] < second["decision"]["champion"]["value"] - 0.02
    else:
        assert second["decision"]["challenger"]["value"] >= (second["decision"]["champion"] or {}).get("value", 0) - 0.02
    assert json.loads((workspace / "champion.json").read_text())["run_id"] == "good"
    assert not lease_file.exists()


@pytest.mark.parametrize("where", ["local", "gs"])
def test_a_held_workspace_is_skipped_waited_for_or_refused_and_recorded(where, tmp_path, request, capsys):
    from tagbeam import lease

    if where == "gs":
        request.getfixturevalue("emulator_credentials")
        root = f"gs://{request.getfixturevalue('gcs_bucket')}/ws"
    else:
        root = str(tmp_path / "ws")
    from tagbeam.workspace import Workspace

    workspace = Workspace(root)
    common = ["--workspace", root, "--input", str(tmp_path / "never-read.csv")]
    with lease.acquire(workspace.lease_file, "holder"):
        assert retrain.main([*common, "--run_id", "s"]) == 0
        assert "skipped: the workspace is held by run holder" in capsys.readouterr().out
        assert retrain.main([*common, "--run_id", "f", "--if_held", "fail"]) == 1
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert "held by run holder" in line and "--if_held fail" in line
        lease.POLL_S, saved = 0.2, lease.POLL_S
        try:
            assert retrain.main([*common, "--run_id", "w", "--if_held", "wait", "--held_wait_s", "0.5"]) == 1
        finally:
            lease.POLL_S = saved
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert "held by run holder" in line and "s (--held_wait_s)" in line
    records = workspace.history()
    assert [(r["run_id"], r["outcome"], r["held_by"]) for r in records] == [
        ("s", "skipped", "holder"), ("f", "failed", "holder"), ("w", "failed", "holder")]
    assert records[2]["waited_s"] >= 0.5


def test_a_workspace_survives_a_cut_pack_a_cut_champion_and_a_copy(manifest, tmp_path):
    import shutil

    original = tmp_path / "ws"
    done = _retrain(original, manifest, "--epochs", "8", "--learning_rate", "0.003")
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0, out
    champion = json.loads((original / "champion.json").read_text())
    # Written relative to the workspace: a copy uses its own files.
    assert champion["export_path"].startswith(f"runs/{champion['run_id']}/model/export/")
    assert champion["labels_file"] == f"runs/{champion['run_id']}/model/labels.txt"
    assert _history(original)[-1]["decision"]["challenger"]["export_path"] == champion["export_path"]

    # A cut-short champion.json: one error line saying what to do, nothing run, nothing promoted.
    good = (original / "champion.json").read_bytes()
    (original / "champion.json").write_bytes(good[:30])
    cut = _retrain(original, manifest, "--epochs", "1")
    out, _ = cut.communicate(timeout=300)
    assert cut.returncode == 1, out
    (line,) = [line for line in out.splitlines() if line.startswith("error:")]
    assert str(original / "champion.json") in line and "not valid JSON" in line and "--restore_champion" in line
    assert "Traceback" not in out
    assert (original / "champion.json").read_bytes() == good[:30]
    assert _history(original)[-1]["outcome"] == "failed"
    restore = _python_m("pipelines.retrain", "--workspace", str(original), "--restore_champion")
    assert restore.returncode == 0, restore.stderr[-3000:]
    assert f"rebuilt from {original / 'history.jsonl'}: run {champion['run_id']}" in restore.stdout
    restored = json.loads((original / "champion.json").read_text())
    assert {k: restored[k] for k in ("run_id", "export_path", "labels_file", "metric", "value")} == {
        k: champion[k] for k in ("run_id", "export_path", "labels_file", "metric", "value")}

    # An older workspace's absolute paths, then a copy whose original is deleted, with a feature
    # pack cut short: the copy's night recomputes those features and compares with its own champion.
    (original / "champion.json").write_text(json.dumps(
        {**champion, "export_path": str(original / champion["export_path"]),
         "labels_file": str(original / champion["labels_file"])}))
    copy = tmp_path / "ws-copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    pack = sorted((copy / "features").glob("*/pack-*.npz"))[0]
    pack.write_bytes(pack.read_bytes()[:100])
    night = _retrain(copy, manifest, "--epochs", "8", "--learning_rate", "0.003", "--seed", "4")
    out, _ = night.communicate(timeout=600)
    assert night.returncode == 0, out
    assert f"feature pack {pack} is unreadable" in out and "set aside" in out
    record = _history(copy)[-1]
    assert record["outcome"] in ("promoted", "refused") and record["champion_before"] == champion["run_id"]
    assert record["decision"]["champion"]["export_path"] == champion["export_path"]  # the copy's own model
    assert str(original) not in json.dumps(record["decision"])
    run_json = json.loads((copy / "runs" / record["run_id"] / "model" / "run.json").read_text())
    assert 0 < run_json["timings"]["feature_extraction_images"] < record["data"]["input_rows"]
    from tagbeam.workspace import Workspace

    now = Workspace(str(copy)).champion()  # a refused night leaves the older absolute form in place
    assert now.run_id == (record["run_id"] if record["outcome"] == "promoted" else champion["run_id"])
    assert now.export_path.startswith(str(copy)) and (Path(now.export_path) / "saved_model.pb").exists()


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
        vocab = str(workspace / json.loads(champion_bytes)["labels_file"])  # relative to the workspace
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


def _gs_images(gcs_bucket: str, count: int) -> tuple[object, list[str]]:
    """(the bucket, manifest rows) for `count` small random JPEGs under images/ on the emulator."""

    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = storage.Client(project="test-project", credentials=AnonymousCredentials()).bucket(gcs_bucket)
    rows = []
    for i in range(count):
        bucket.blob(f"images/{i}.jpg").upload_from_string(noise_image(i, (40, 40)))
        rows.append(f"k{i},images/{i}.jpg,{'cat' if i % 2 else 'dog'}\n")
    return bucket, rows


def test_a_gs_workspace_reuses_its_newest_dataset(gcs_bucket, emulator_credentials, tmp_path):
    # The data steps on a gs:// workspace (the GCS emulator). TensorFlow's own file system cannot reach
    # an emulator, so the train step is tested on local workspaces only.
    bucket, rows = _gs_images(gcs_bucket, 14)
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


def test_two_retrains_started_together_on_a_gs_workspace(gcs_bucket, emulator_credentials):
    # The steps that run on the emulator (preprocess: Beam and google-cloud-storage); the lease is an
    # object created with if_generation_match=0, history lines are appended with generation
    # preconditions. Training and promotion need TensorFlow's file system, which cannot reach an
    # emulator: their concurrency is tested on local workspaces, champion.json's compare-and-swap on
    # gs:// in tests/test_lease.py.
    bucket, rows = _gs_images(gcs_bucket, 8)
    bucket.blob("m.csv").upload_from_string("key,uri,labels\n" + "".join(rows))
    workspace = f"gs://{gcs_bucket}/ws"
    common = ["pipelines.retrain", "--workspace", workspace, "--id_column", "key", "--image_size", "32",
              "--step", "preprocess", "--input", f"gs://{gcs_bucket}/m.csv"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = {run_id: subprocess.Popen([sys.executable, "-m", *common, "--run_id", run_id, "--if_held", "wait"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for run_id in ("a", "b")}
    deadline = time.time() + 120
    while bucket.get_blob("ws/workspace.lease") is None and time.time() < deadline:
        time.sleep(0.2)
    skipped = _python_m(*common, "--run_id", "c")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "skipped: the workspace is held by run " in skipped.stdout
    outs = {run_id: proc.communicate(timeout=600)[0] for run_id, proc in procs.items()}
    assert all(proc.returncode == 0 for proc in procs.values()), outs
    records = [json.loads(line) for line in bucket.blob("ws/history.jsonl").download_as_text().splitlines()]
    assert sorted(r["run_id"] for r in records) == ["a", "b", "c"]
    (cron,) = [r for r in records if r["run_id"] == "c"]
    assert cron["outcome"] == "skipped" and cron["held_by"] in ("a", "b")
    first, second = [r for r in records if r["run_id"] != "c"]
    assert first["outcome"] == second["outcome"] == "step done"
    assert "waited_s" in second and "waiting" in outs[second["run_id"]]
    assert bucket.get_blob("ws/workspace.lease") is None


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


def _flags(model_dir: Path) -> dict:
    return {k: v for k, v in json.loads((model_dir / "run.json").read_text())["flags"].items() if k not in PATHS}


def test_a_scheduled_challenger_trains_exactly_as_the_trainer_does_by_default(prepared, tmp_path):
    # No training flag: the challenger must get trainer.task's own defaults (once it got 30 epochs
    # from retrain's copy of --epochs while the trainer's default was 300). Every step in one run is
    # test_promote_refuse_and_survive_a_kill's; here the train step, on the prepared dataset.
    run_id = "base"
    workspace = _copy(prepared, tmp_path, run_id)
    done = _python_m("pipelines.retrain", "--workspace", str(workspace), "--run_id", run_id, "--step", "train")
    assert done.returncode == 0, done.stderr[-3000:]
    direct = _python_m("trainer.task", "--data_dir", str(workspace / "runs" / run_id / "dataset"),
                       "--model_dir", str(tmp_path / "direct"))
    assert direct.returncode == 0, direct.stderr[-3000:]
    scheduled = _flags(workspace / "runs" / run_id / "model")
    assert scheduled == _flags(tmp_path / "direct")
    recorded = json.loads((workspace / "runs" / run_id / "model" / "run.json").read_text())["flags"]
    assert recorded["feature_store"] == str(workspace / "features")
    assert scheduled["epochs"] is None and scheduled["early_stopping_patience"] is None  # the path's defaults


def test_every_training_option_reaches_the_challenger_through_retrain(manifest, prepared, tmp_path):
    from tagbeam.flags import declared
    from trainer.config import TrainOptions

    # Two runs, because --positive_weights and --loss soft_f1 exclude each other. Run "a" gives its
    # flags to the preprocess step only: the train step must run with what that step recorded (as
    # under Vertex AI Pipelines). Run "b" gives them to the train step itself, so its preprocess
    # step is the prepared one (recorded without training flags).
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
    workspace = _copy(prepared, tmp_path, "b")
    for run_id, values in runs.items():
        argv = []
        for flag, value in values.items():
            assert value != options[flag].default, flag
            argv += [f"--{flag}"] if value is True else [f"--{flag}", str(value)]
        common = ["pipelines.retrain", "--workspace", str(workspace), "--run_id", run_id]
        if run_id == "a":
            done = _python_m(*common, "--step", "preprocess", "--input", manifest, *PREPROCESS_FLAGS, *argv)
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
