"""Running the entry points from tests, in one place: in this process (faster, and a failure shows
its traceback) or as `python -m` in a fresh process (what a scheduler runs)."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any


def preprocess(argv: list[str]) -> dict:
    """`python -m pipelines.preprocess` in this process; returns dataset.json's content."""
    from pipelines import preprocess as entry_point

    job, pipeline_args = entry_point.parse_args(argv)
    return entry_point.run(job, pipeline_args)


def train(argv: list[str]) -> Any:
    """`python -m trainer.task` in this process; returns its RunOutcome."""
    from trainer import task

    return task.run(*task.parse_args(argv))


def python_m(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m <argv>` in a fresh process, output captured (TensorFlow's C++ notices off)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout, env=env)
