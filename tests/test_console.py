"""What the commands print: TensorFlow's C++ start-up noise filtered, progress with rate and ETA."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from tagbeam import console

REPO = Path(__file__).resolve().parents[1]
NOISE = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"I0000 00:00:1796076183.056878    6106 port.cc:153] oneDNN custom operations are on.",
    b"I0000 00:00:1796076183.057143    6106 cudart_stub.cc:31] Could not find cuda drivers on your machine",
    b"E0000 00:00:1796075222.122743    6769 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
    b"W0000 00:00:1796075222.122743    6769 some_file.cc:9] a C++ warning",
    b"E0000 00:00:1796076727.069954   21039 util.cc:131] oneDNN supports DT_BOOL only on platforms with AVX-512. "
    b"Falling back to the default Eigen-based implementation if present.",
    b"To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    b"appropriate compiler flags.",
]
KEPT = [
    b"E0000 00:00:1796075222.122743    6769 tfrecord_reader.cc:12] DATA_LOSS: corrupted record at 12",
    b"2026-11-30 21:00:00 INFO trainer.train: epoch 3/300: loss 0.2",
    b"error: --data_dir x: no dataset.json",
    b"Traceback (most recent call last):",
]


def test_noise_is_only_tensorflows_startup_chatter():
    assert all(console.is_native_noise(line) for line in NOISE)
    assert not any(console.is_native_noise(line) for line in KEPT)


def _run(env_extra: dict[str, str]) -> str:
    script = ("from tagbeam import console\nconsole.quiet_native_logs()\nimport sys\n"
              "import tensorflow as tf\ntf.constant(1) + 1\n"
              "print('error: a real message', file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**env, **env_extra})
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_commands_print_no_tensorflow_startup_noise_unless_asked():
    quiet = _run({})
    assert "error: a real message" in quiet
    assert "oneDNN" not in quiet and "absl::InitializeLog" not in quiet, quiet
    loud = _run({console.SHOW_NATIVE_LOGS: "1"})
    assert "oneDNN" in loud and "error: a real message" in loud, loud


def test_progress_line_has_count_rate_and_eta(caplog):
    log = logging.getLogger("test.progress")
    progress = console.Progress(log, "train: backbone features", 100, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        progress.update(25)
        final = (progress.update(75), progress.finish())[1]
    assert "train: backbone features: 25/100 images (" in caplog.text and "ETA" in caplog.text
    assert final.startswith("train: backbone features: 100/100 images (") and "ETA" not in final
