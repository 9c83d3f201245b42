"""The workspace lease, champion compare-and-swap and history appends, on a local disk and on gs://
(the GCS emulator, with the generation preconditions real GCS has: conftest.py)."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from tagbeam import lease, storage
from tagbeam.workspace import Champion, Workspace


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "ws")
    request.getfixturevalue("emulator_credentials")  # for what goes through Beam's GCS client
    return f"gs://{request.getfixturevalue('gcs_bucket')}/ws"


def _lease_of(holder: dict) -> bytes:
    return json.dumps({"run_id": "other", "host": socket.gethostname(), "pid": os.getpid(),
                       "started": "2026-01-01T00:00:00+00:00", "expires": "2999-01-01T00:00:00+00:00",
                       **holder}).encode()


def test_one_holder_at_a_time_and_a_waiter_says_so(root):
    path = Workspace(root).lease_file
    with lease.acquire(path, "first") as held:
        assert json.loads(storage.read_versioned(path)[0])["run_id"] == "first"
        seen = []
        with pytest.raises(lease.Held) as err:
            lease.acquire(path, "second", wait_s=0.3, progress=lambda holder, left: seen.append(holder.run_id))
        assert err.value.holder.run_id == "first" and err.value.waited_s >= 0.3
        assert seen == ["first"]
        before = held.holder.expires
        held.renew()
        assert json.loads(storage.read_versioned(path)[0])["expires"] >= before
    assert storage.read_versioned(path) == (None, storage.ABSENT)
    with lease.acquire(path, "second") as taken:
        assert taken.took_over is None


@pytest.mark.parametrize("stale", [{"pid": 2 ** 22 + 12345}, {"host": "elsewhere", "expires": "2001-01-01T00:00:00+00:00"}],
                         ids=["dead pid on this host", "expired elsewhere"])
def test_a_stale_lease_is_taken_over_and_its_holder_learns_it_lost(root, stale, caplog):
    path = Workspace(root).lease_file
    storage.create_exclusive(path, _lease_of(stale))
    with caplog.at_level(logging.WARNING, logger="tagbeam.lease"):
        taken = lease.acquire(path, "next")
    assert taken.took_over.run_id == "other"
    (line,) = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    assert "run other" in line and ("is gone" in line or "expired" in line)
    # A live holder elsewhere is not stale: it is waited for, not taken over.
    with pytest.raises(lease.Held):
        lease.acquire(path, "third")
    # A run whose stale lease was taken over finds out before it promotes.
    storage.write_bytes(path, _lease_of({"run_id": "intruder"}))
    with pytest.raises(lease.LeaseLost, match="intruder"):
        taken.check()
    taken.release()
    assert json.loads(storage.read_versioned(path)[0])["run_id"] == "intruder"  # not ours to delete


def test_champion_is_replaced_only_if_it_is_still_what_was_compared(root):
    workspace = Workspace(root)

    def champion(run_id: str) -> Champion:
        return Champion(run_id=run_id, export_path=f"{root}/runs/{run_id}/model/export/1",
                        labels_file=f"{root}/runs/{run_id}/model/labels.txt", metric="macro_f1", value=0.5,
                        promoted_at="2026-01-01T00:00:00+00:00")

    none, version = workspace.champion_versioned()
    assert none is None
    assert workspace.replace_champion(champion("a"), version)
    assert not workspace.replace_champion(champion("b"), version)  # b compared with "no champion": lost
    current, version = workspace.champion_versioned()
    assert current.run_id == "a"
    assert workspace.replace_champion(champion("b"), version)
    assert workspace.champion().run_id == "b"


APPENDER = """
import sys
from tagbeam.workspace import Workspace
workspace = Workspace(sys.argv[1])
for i in range(int(sys.argv[3])):
    workspace.append_history({"writer": sys.argv[2], "i": i, "pad": "x" * 3000})
"""


def test_history_appends_stay_whole_lines_under_concurrent_writers(root):
    workspace = Workspace(root)
    storage.makedirs(root)
    writers, each = 3, 8 if storage.is_remote(root) else 200
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, root, f"w{k}", str(each)], env=env,
                              stderr=subprocess.PIPE, text=True) for k in range(writers)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    records = workspace.history()
    assert len(records) == writers * each
    for k in range(writers):
        assert [r["i"] for r in records if r["writer"] == f"w{k}"] == list(range(each))
