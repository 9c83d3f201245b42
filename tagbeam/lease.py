"""A workspace lease: one retrain at a time holds a workspace (local or gs://).

The lease is a small JSON file (`workspace.lease`, tagbeam/workspace.py) created exclusively:
O_CREAT|O_EXCL on a local disk, `if_generation_match=0` on gs://. It names its holder (run id,
host, pid, start) and an expiry. The holder renews it from a thread every RENEW_S: the night
spends hours in child processes (preprocess, trainer) with no step boundary in the process that
holds the lease, so only a thread can keep it fresh; a holder killed with SIGKILL stops renewing,
and its lease is stale once it expires (LEASE_S) - or at once, seen from the same host, when its
pid is gone. A stale lease is taken over (with a logged line) by replacing exactly the stale
version: the gs:// generation precondition, or a short exclusive takeover file locally.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from tagbeam import storage

log = logging.getLogger("tagbeam.lease")

LEASE_S = 600.0  # a lease not renewed for this long is stale
RENEW_S = 60.0
POLL_S = 10.0  # how often a waiting run looks again (and says so)
TAKEOVER_MARK = ".takeover"  # `<lease>.takeover`: a local run replacing a stale lease
TAKEOVER_STALE_S = 60.0  # a takeover takes milliseconds; one this old was killed half-way


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(when: dt.datetime) -> str:
    return when.isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lease, as its file says."""

    run_id: str
    host: str
    pid: int
    started: str
    expires: str

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        try:
            meta = json.loads(data)
            return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls)})
        except (ValueError, TypeError, KeyError):
            return None

    def stale_because(self, now: dt.datetime) -> str | None:
        """Why this lease may be taken over, or None while its holder may still be working."""
        try:
            expires = dt.datetime.fromisoformat(self.expires)
        except (TypeError, ValueError):
            return f"its expiry {self.expires!r} is unreadable"
        if expires <= now:
            return f"it expired at {self.expires}"
        if self.host == socket.gethostname() and not _alive(self.pid):
            return f"its process {self.pid} on this host is gone"
        return None

    def describe(self) -> str:
        return f"run {self.run_id} (pid {self.pid} on {self.host}, since {self.started}, lease until {self.expires})"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Held(Exception):
    """The workspace is held by another live run."""

    def __init__(self, holder: Holder, waited_s: float = 0.0) -> None:
        super().__init__(f"the workspace is held by {holder.describe()}")
        self.holder, self.waited_s = holder, waited_s


class LeaseLost(RuntimeError):
    """Another run took this lease over (it had not been renewed in time)."""


class Lease:
    """A held lease; `release()` (or the context manager) gives it back."""

    def __init__(self, path: str, holder: Holder, version: str, took_over: Holder | None, waited_s: float) -> None:
        self.path, self.holder, self.took_over, self.waited_s = path, holder, took_over, waited_s
        self._version = version
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lost: str | None = None
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self.renew()
            except LeaseLost as err:
                log.error("%s", err)
                return
            except Exception as err:  # noqa: BLE001 - a blip of the store: the next renewal may work
                log.warning("could not renew the workspace lease %s: %s", self.path, err)

    def renew(self) -> None:
        with self._lock:
            if self._lost:
                raise LeaseLost(self._lost)
            holder = dataclasses.replace(self.holder, expires=_iso(_now() + dt.timedelta(seconds=LEASE_S)))
            version = storage.write_if_version(self.path, _encode(holder), self._version)
            if version is None:
                current = Holder.from_bytes(storage.read_versioned(self.path)[0] or b"")
                self._lost = (f"the workspace lease {self.path} of run {self.holder.run_id} was taken over by "
                              f"{current.describe() if current else 'another run'}: this run no longer holds it")
                raise LeaseLost(self._lost)
            self.holder, self._version = holder, version

    def check(self) -> None:
        """Raises LeaseLost unless this run still holds the lease (renewing it on the way)."""
        self.renew()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if not self._lost and not storage.delete_if_version(self.path, self._version):
                log.warning("the workspace lease %s was no longer this run's when it ended", self.path)
            self._lost = self._lost or "released"

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _encode(holder: Holder) -> bytes:
    return (json.dumps(holder.to_json(), indent=2) + "\n").encode("utf-8")


def acquire(path: str, run_id: str, wait_s: float = 0.0,
            progress: Callable[[Holder, float], None] | None = None) -> Lease:
    """Takes the lease at `path` for `run_id`, taking over a stale one. While a live run holds it,
    looks again every POLL_S for up to `wait_s` seconds (calling `progress(holder, seconds_left)`),
    then raises Held."""
    started = time.monotonic()
    while True:
        now = _now()
        mine = Holder(run_id=run_id, host=socket.gethostname(), pid=os.getpid(), started=_iso(now),
                      expires=_iso(now + dt.timedelta(seconds=LEASE_S)))
        version = storage.create_exclusive(path, _encode(mine))
        if version is not None:
            return Lease(path, mine, version, None, time.monotonic() - started)
        data, version = storage.read_versioned(path)
        if data is None:
            continue  # released between our two looks
        holder = Holder.from_bytes(data)
        why = holder.stale_because(now) if holder else "its file is unreadable"
        if why and (holder or _old_enough(path)):
            taken = _take_over(path, version, _encode(mine))
            if taken is not None:
                log.warning("took over the workspace lease %s from %s: %s",
                            path, holder.describe() if holder else "an unknown run", why)
                return Lease(path, mine, taken, holder, time.monotonic() - started)
            continue  # someone else took it over first, or its holder renewed it: look again
        if holder is None:  # being written this instant (local create, then write)
            time.sleep(0.1)
            continue
        left = wait_s - (time.monotonic() - started)
        if left <= 0:
            raise Held(holder, time.monotonic() - started)
        if progress:
            progress(holder, left)
        time.sleep(min(POLL_S, left))


def _old_enough(path: str) -> bool:
    """An unreadable local lease may be one being written right now; one older than a few seconds is not."""
    return storage.is_remote(path) or time.time() - os.stat(path).st_mtime > 5.0


def _take_over(path: str, stale_version: str, data: bytes) -> str | None:
    """Replaces the lease if it still is the stale version that was judged; its new version or None."""
    if storage.is_remote(path):
        return storage.write_if_version(path, data, stale_version)
    # Locally the version check and the rename are two steps: an exclusive takeover file makes
    # them one for every other run taking over.
    guard = path + TAKEOVER_MARK
    if storage.create_exclusive(guard, _mark()) is None:
        try:
            if time.time() - os.stat(guard).st_mtime > TAKEOVER_STALE_S:
                os.remove(guard)
        except FileNotFoundError:
            pass
        return None
    try:
        return storage.write_if_version(path, data, stale_version)
    finally:
        os.remove(guard)


def _mark() -> bytes:
    return f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}\n".encode()
