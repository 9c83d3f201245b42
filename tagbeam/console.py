"""What the project's commands print, so that a person can read it.

- `quiet_native_logs()`: TensorFlow's C++ start-up lines (oneDNN notices, CUDA stubs, cuInit
  errors on machines without a GPU) are printed by absl before TensorFlow reads
  TF_CPP_MIN_LOG_LEVEL, so no variable silences them. The entry points route the process's stderr
  through a filter that drops absl's INFO and WARNING lines and its CUDA-probe errors, and passes
  everything else through unchanged. `TAGBEAM_NATIVE_LOGS=1` turns the filter off.
- `Progress`: a line with count, rate and ETA at most every few seconds, for long steps (the same
  lines on a Beam worker and in a terminal: plain log lines, no terminal-only bars).
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import time

SHOW_NATIVE_LOGS = "TAGBEAM_NATIVE_LOGS"
# absl's C++ log line: severity letter, MMDD, time, thread id, file:line] message.
_ABSL = re.compile(rb"^([IWEF])\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\] ")
_ABSL_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# Errors that only say there is no GPU driver, or that oneDNN falls back to Eigen for a type; any
# other error line passes.
_NOT_ERRORS = re.compile(rb"cuInit|CUDA error|cuda drivers|libcuda|cuda_platform|cuda_diagnostics|kernel driver|"
                         rb"oneDNN supports \w+ only on platforms")
# The second line of cpu_feature_guard's notice, which has no absl prefix of its own.
_CPU_FEATURES = re.compile(rb"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags")
_installed = False


def is_native_noise(line: bytes) -> bool:
    """Whether one stderr line is start-up noise of TensorFlow's C++ runtime."""
    if line.startswith(_ABSL_PREAMBLE) or _CPU_FEATURES.match(line):
        return True
    match = _ABSL.match(line)
    if not match:
        return False
    return match.group(1) in (b"I", b"W") or (match.group(1) == b"E" and bool(_NOT_ERRORS.search(line)))


def _pump(read_fd: int, out_fd: int) -> None:
    pending = b""
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        kept = b"".join(line + b"\n" for line in lines if not is_native_noise(line))
        if kept:
            os.write(out_fd, kept)
    if pending and not is_native_noise(pending):
        os.write(out_fd, pending)
    os.close(read_fd)


def quiet_native_logs() -> None:
    """Filters TensorFlow's C++ start-up noise out of this process's stderr (file descriptor 2,
    which child processes inherit). Call it first thing in an entry point's `__main__` block."""
    global _installed
    if _installed or os.environ.get(SHOW_NATIVE_LOGS, "").lower() in ("1", "true", "yes"):
        return
    _installed = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # what TensorFlow does honour, once it reads it
    sys.stderr.flush()
    real_stderr = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    pump = threading.Thread(target=_pump, args=(read_fd, real_stderr), name="stderr-filter", daemon=True)
    pump.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(real_stderr, 2)  # closes our write end: the pump drains what is left and ends
        pump.join(timeout=5)

    atexit.register(restore)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Logs `<what>: done/total <unit> (rate/s, ETA)` at most every `every_s` seconds, and once at the end."""

    def __init__(self, log: logging.Logger, what: str, total: int, unit: str = "images", every_s: float = 10.0) -> None:
        self._log, self._what, self._total, self._unit, self._every_s = log, what, total, unit, every_s
        self._start = self._last = time.monotonic()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self._every_s and self.done < self._total:
            self._last = now
            self._log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._start, 1e-9)
        rate = self.done / elapsed
        text = f"{self._what}: {self.done}/{self._total} {self._unit} ({rate:.1f}/s"
        if self.done < self._total and rate > 0:
            text += f", ETA {_duration((self._total - self.done) / rate)}"
        return text + f", {_duration(elapsed)} so far)" if self.done < self._total else text + f" in {_duration(elapsed)})"

    def finish(self) -> str:
        """The final line (also logged)."""
        line = self.line()
        self._log.info("%s", line)
        return line
