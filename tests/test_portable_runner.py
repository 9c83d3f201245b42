"""Preprocess and batch predict on Beam's portable runner, with the SDK workers in a worker pool that
the test starts and stops: the pipeline is serialised, handed to a job service and run by harnesses
that import the project afresh in another process - as on Flink, Spark or Dataflow Runner v2. The
folders they write are compared with the FnApiRunner's, file by file."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_predict import _with_bad_rows, exported, posters  # noqa: F401 - fixtures, shared with test_predict

from pipelines import predict, predict_report, preprocess

from conftest import free_port

# TFT's SavedModel graph names its functions with process-wide counters (`__inference_..._626`)
# and holds the run's temporary folder: it differs between any two runs, even on one runner. Its
# vocabulary, variables and schema are compared byte for byte.
LAUNCH = Path(__file__).resolve().parents[1] / "deploy" / "portable" / "launch.sh"
_RUN_DEPENDENT = {"transform_output/transform_fn/saved_model.pb", "transform_output/transform_fn/fingerprint.pb"}


def _wait_listening(port: int, pool: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pool.poll() is not None:
            raise RuntimeError(f"the worker pool exited with code {pool.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the worker pool did not listen on port {port} within {timeout_s} s")


@pytest.fixture(scope="module")
def worker_pool(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """Beam's external worker pool on a free port: (its address, its log). It starts each SDK
    worker as `python` from PATH (so the venv's comes first) with this environment (PYTHONPATH
    included, so the workers import this checkout)."""
    port = free_port()
    log = tmp_path_factory.mktemp("pool") / "worker_pool.log"
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    with open(log, "wb") as out:
        pool = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                                 f"--service_port={port}"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_listening(port, pool)
        yield f"localhost:{port}", log
    finally:
        os.killpg(pool.pid, signal.SIGTERM)  # its own process group: the pool and the workers it started
        try:
            pool.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pool.pid, signal.SIGKILL)
            pool.wait()


def _portable(address: str) -> list[str]:
    return ["--runner", "PortableRunner", "--job_endpoint", "embed", "--environment_type", "EXTERNAL",
            "--environment_config", address]


def _workers_started(log: Path) -> int:
    return log.read_text(errors="replace").count("Starting worker with command")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, posters, exported, worker_pool) -> dict[str, Path]:  # noqa: F811 - fixtures
    """Preprocess and predict over the held-out posters plus rows that must be rejected, once on
    the FnApiRunner and once on the portable runner."""
    tmp = tmp_path_factory.mktemp("portable")
    manifest, _ = _with_bad_rows(posters, tmp)
    address, log = worker_pool
    outputs = {}
    for name, runner_args in (("fnapi", []), ("portable", _portable(address))):
        data, predicted = tmp / f"{name}-dataset", tmp / f"{name}-predictions"
        job = ["--input", manifest, "--output", str(data), "--allow_local_files", "--image_size", "32",
               "--target_shard_mb", "0.02"]
        if runner_args:  # through deploy/portable/launch.sh, the cluster launcher, with an embedded job service
            env = {**os.environ, "PYTHON": sys.executable, "JOB_ENDPOINT": "embed", "TEMP_LOCATION": str(tmp),
                   "ENVIRONMENT_TYPE": "EXTERNAL", "ENVIRONMENT_CONFIG": address}
            done = subprocess.run([str(LAUNCH), "preprocess", *job], env=env, capture_output=True, text=True,
                                  timeout=300, check=False)
            assert done.returncode == 0, done.stderr[-3000:]
        else:
            assert preprocess.main(job) == 0
        started = _workers_started(log)
        assert predict.main(["--input", manifest, "--model", exported[0], "--output", str(predicted),
                             "--allow_local_files", "--batch_size", "8", *runner_args]) == 0
        # Each portable job's work happened in workers of the pool, not in this process.
        assert _workers_started(log) - started == (1 if runner_args else 0)
        assert started == (1 if runner_args else 0), log.read_text(errors="replace")[-2000:]
        outputs[f"{name}-dataset"], outputs[f"{name}-predictions"] = data, predicted
    return outputs


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def test_preprocess_on_the_portable_runner_writes_the_fnapi_runners_bytes(runs):
    ours, theirs = _files(runs["portable-dataset"]), _files(runs["fnapi-dataset"])
    assert sorted(ours) == sorted(theirs)
    names = [n for n in ours if not (n == "dataset.json" or n in _RUN_DEPENDENT)]
    assert [n for n in names if ours[n] != theirs[n]] == []
    assert any(re.fullmatch(r"train-\d{5}-of-\d{5}\.tfrecord", n) for n in names) and "labels.txt" in names
    rejected = [n for n in names if n.startswith("rejected-")]
    assert rejected and all(ours[n] == theirs[n] for n in rejected)
    assert sum(len(ours[n].splitlines()) for n in rejected) == 6  # the six bad rows, each with its reason
    # dataset.json differs where the runs did: its folder, the runner, and when it was written.
    mine, other = json.loads(ours["dataset.json"]), json.loads(theirs["dataset.json"])
    assert (mine["options"]["runner"], other["options"]["runner"]) == ("PortableRunner", "FnApiRunner")
    assert _without(mine, "options", "created") == _without(other, "options", "created")
    assert _without(mine["options"], "output", "runner") == _without(other["options"], "output", "runner")


def test_predict_on_the_portable_runner_writes_the_fnapi_runners_bytes(runs):
    ours, theirs = _files(runs["portable-predictions"]), _files(runs["fnapi-predictions"])
    assert sorted(ours) == sorted(theirs)
    summaries = (predict.SUMMARY_JSON, predict_report.SUMMARY_HTML)
    assert [n for n in ours if n not in summaries and ours[n] != theirs[n]] == []
    # The page names the folder it was written to, and is otherwise the same.
    folders = [str(runs[name]).encode() for name in ("portable-predictions", "fnapi-predictions")]
    page = predict_report.SUMMARY_HTML
    assert folders[0] in ours[page]
    assert ours[page].replace(folders[0], b"OUTPUT") == theirs[page].replace(folders[1], b"OUTPUT")
    assert any(n.startswith("predictions-") for n in ours) and any(n.startswith("rejected-") for n in ours)
    # summary.json records the options as given, so only --output differs.
    mine, other = json.loads(ours[predict.SUMMARY_JSON]), json.loads(theirs[predict.SUMMARY_JSON])
    assert (mine["predicted"], mine["rejected"]) == (24, 6)
    assert _without(mine, "options") == _without(other, "options")
    assert _without(mine["options"], "output") == _without(other["options"], "output")
