"""Two workers on 127.0.0.1 train one model with MultiWorkerMirroredStrategy (TF_CONFIG), as
Vertex AI or any TF cluster launcher would start them: the same command on every worker."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
from test_task import _SERVE_SCRIPT, _test_image_bytes

from tagbeam import dataset

from backbone_factory import write_backbone
from dataset_factory import write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ["circle", "square", "triangle", "cross"]
TIMEOUT_S = 120


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def test_two_workers_train_one_model_and_only_the_chief_exports(tmp_path) -> None:
    backbone = write_backbone(str(tmp_path / "backbone"))
    root = write_dataset(str(tmp_path / "ds"), {"train": 64, "val": 24, "test": 16}, 32, LABELS, seed=8, shards=2)
    model_dir = tmp_path / "model"
    hosts = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    # Fine-tuning: extraction for the warm start (each worker's replica rows, gathered), then
    # backbone + head under the strategy, each worker on its shard of every global batch.
    command = [sys.executable, "-m", "trainer.task", "--data_dir", root, "--model_dir", str(model_dir),
               "--hub_handle", backbone, "--seed", "1", "--fine_tune_layers", "2", "--epochs", "2",
               "--warm_start_epochs", "3", "--batch_size", "16", "--version", "1"]
    workers, logs = [], []
    try:
        for index in range(2):
            scratch = tmp_path / f"tmp{index}"
            scratch.mkdir()
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(scratch),
                   "TF_CONFIG": json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})}
            logs.append(open(tmp_path / f"worker{index}.log", "w"))
            workers.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        for worker in workers:
            worker.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=30)
        for log in logs:
            log.close()
    outputs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)

    assert os.listdir(model_dir / "export") == ["1"]  # exactly one export, the chief's
    run_info = json.loads((model_dir / "run.json").read_text())
    assert run_info["num_replicas_in_sync"] == 2 and run_info["epochs_completed"] == 2
    assert {"/job:worker/replica:0/task:0/device:CPU:0"} == set(run_info["devices"])
    assert (model_dir / "metrics.json").exists() and (model_dir / "thresholds.json").exists()
    assert "the chief writes the outputs" in outputs[1] and "[trainer] 2 epoch(s)" in outputs[0]
    # Worker 1 wrote its outputs to scratch space and removed them.
    assert os.listdir(tmp_path / "tmp1") == []
    assert not (model_dir / "backup" / "chief").exists()  # removed once training finished

    images = tmp_path / "images"
    images.mkdir()
    for i, encoded in enumerate(_test_image_bytes(dataset.read(root), 4)):
        (images / f"{i}.jpg").write_bytes(encoded)
    served = subprocess.run([sys.executable, "-I", "-c", _SERVE_SCRIPT, str(model_dir / "export" / "1"), str(images),
                             str(tmp_path / "served.npy")], cwd=tmp_path, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                            capture_output=True, text=True, timeout=120)
    assert served.returncode == 0, served.stderr[-3000:]
    probabilities = np.load(tmp_path / "served.npy")
    assert probabilities.shape == (4, len(LABELS)) and np.all((probabilities >= 0) & (probabilities <= 1))
