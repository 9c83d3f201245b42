"""Workspace state that survives what happens to folders: relative paths (copies, moves), corrupt
state files (one error line, champion rebuilt from history), bad cache entries (a miss), on a local
disk and on gs:// (the GCS emulator; the train step itself cannot run there: tests/test_retrain.py)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from pipelines import retrain
from tagbeam import storage
from tagbeam.workspace import Champion, StateError, Workspace


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "ws")
    request.getfixturevalue("emulator_credentials")
    return f"gs://{request.getfixturevalue('gcs_bucket')}/ws"


def _night(workspace: Workspace, run_id: str, value: float, outcome: str = "promoted") -> Champion:
    """What a promoted night leaves: its export (a saved_model.pb stands for it: only its presence is
    read here) and its history record."""
    export = storage.join(workspace.model_dir(run_id), "export", "1")
    storage.write_bytes(storage.join(export, "saved_model.pb"), b"model")
    workspace.append_history({"time": f"2026-01-0{len(workspace.history()) + 1}T03:00:00+00:00", "run_id": run_id,
                              "outcome": outcome, "decision": {"metric": "macro_f1", "promoted": outcome == "promoted",
                                                               "challenger": {"export_path": export, "value": value}}})
    return Champion(run_id=run_id, export_path=export, labels_file=storage.join(workspace.model_dir(run_id),
                    "labels.txt"), metric="macro_f1", value=value, promoted_at="x")


def _copy_tree(source: str, target: str) -> None:
    for path in storage.match(storage.join(source, "**")):
        storage.write_bytes(target + path[len(source):], storage.read_bytes(path))


def test_a_copied_workspace_uses_its_own_champion_also_from_older_absolute_paths(root):
    workspace = Workspace(root)
    champion = _night(workspace, "r1", 0.5)
    assert workspace.replace_champion(champion, storage.ABSENT)
    written = json.loads(storage.read_text(workspace.champion_file))
    assert written["export_path"] == "runs/r1/model/export/1" and written["labels_file"] == "runs/r1/model/labels.txt"
    assert workspace.champion() == champion  # resolved in the workspace
    # champion.json as older versions wrote it (absolute), then copied and the original deleted.
    storage.write_json(workspace.champion_file, {**written, "export_path": champion.export_path,
                                                 "labels_file": champion.labels_file})
    copy = Workspace(root + "-copy")
    _copy_tree(root, copy.root)
    storage.remove_tree(root)
    if not storage.is_remote(root):
        assert not storage.exists(champion.export_path)
    moved = copy.champion()
    assert moved.export_path == storage.join(copy.root, "runs/r1/model/export/1")
    assert storage.exists(storage.join(moved.export_path, "saved_model.pb"))
    assert copy.champion_from_history().export_path == moved.export_path


def test_a_cut_champion_is_one_error_line_and_is_rebuilt_from_history(root, capsys):
    workspace = Workspace(root)
    first = _night(workspace, "r1", 0.5)
    _night(workspace, "r2", 0.4, outcome="refused")
    second = _night(workspace, "r3", 0.6)
    storage.remove_tree(workspace.model_dir("r3"))  # pruned by hand: its promotion cannot be restored
    assert workspace.replace_champion(second, storage.ABSENT)
    storage.write_bytes(workspace.champion_file, b'{"run_id": "r3", "export_pa')
    with pytest.raises(StateError, match="not valid JSON.*--restore_champion"):
        workspace.champion()
    # The night stops at once with one line (no Beam, no training), recorded in history.
    assert retrain.main(["--workspace", root, "--step", "preprocess", "--input", "never-read.csv"]) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert workspace.champion_file in line and "--restore_champion" in line and "Traceback" not in err
    assert workspace.history()[-1]["outcome"] == "failed"
    assert retrain.main(["--workspace", root, "--restore_champion"]) == 0
    assert "rebuilt from" in capsys.readouterr().out
    restored = workspace.champion()
    assert (restored.run_id, restored.export_path, restored.value) == ("r1", first.export_path, 0.5)
    assert workspace.history()[-1]["outcome"] == "champion restored"


def test_history_tolerates_a_half_last_line_and_names_a_bad_one(root):
    workspace = Workspace(root)
    _night(workspace, "r1", 0.5)
    text = storage.read_text(workspace.history_file)
    storage.write_text(workspace.history_file, text + '{"run_id": "killed", "outc')
    assert [r["run_id"] for r in workspace.history()] == ["r1"]
    _night(workspace, "r2", 0.6)  # the half line stays on its own line
    assert [r["run_id"] for r in workspace.history()] == ["r1", "r2"]
    # A hand-edited line is named, not skipped silently (but the champion's rebuild reads past it).
    storage.write_text(workspace.history_file, storage.read_text(workspace.history_file) + '{"run_id": r4}\n')
    with pytest.raises(StateError, match=r"history.jsonl line 4 is not a JSON record"):
        workspace.history()
    assert [r["run_id"] for r in workspace.history(skip_bad=True)] == ["r1", "r2"]
    assert workspace.champion_from_history().run_id == "r2"


def test_a_run_whose_recorded_options_are_cut_is_one_error_line(root, capsys):
    workspace = Workspace(root)
    storage.write_bytes(workspace.run_options("r1"), b'{"argv": ["--inp')
    assert retrain.main(["--workspace", root, "--run_id", "r1", "--step", "train"]) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert workspace.run_options("r1") in line and "--step preprocess" in line


def test_a_cut_feature_pack_is_a_miss_and_is_set_aside(root, tmp_path, caplog):
    import logging

    from tagbeam import dataset
    from trainer.features import FeatureStore

    from dataset_factory import write_dataset

    info = dataset.read(write_dataset(str(tmp_path / "data"), {"train": 4, "val": 2, "test": 2}, 32, ["a", "b"], 1))
    store = FeatureStore(storage.join(root, "features"), info, str(tmp_path / "backbone"))
    good, bad = (storage.join(store.directory, f"pack-{name}.npz") for name in ("good", "bad"))
    for path, seed in ((good, 1), (bad, 2)):
        buffer = io.BytesIO()
        rng = np.random.default_rng(seed)
        np.savez(buffer, keys=rng.integers(0, 256, (3, 32), dtype=np.uint8), features=rng.random((3, 8), np.float32))
        storage.write_bytes(path, buffer.getvalue())
    storage.write_bytes(bad, storage.read_bytes(bad)[:100])
    with caplog.at_level(logging.WARNING, logger="trainer.features"):
        known = FeatureStore(storage.join(root, "features"), info, str(tmp_path / "backbone"))._load()
    assert len(known) == 3
    (line,) = [r.getMessage() for r in caplog.records if r.name == "trainer.features"]
    assert f"feature pack {bad} is unreadable" in line and "set aside" in line
    assert not storage.exists(bad) and len(storage.match(bad + ".bad-*")) == 1


def test_a_cut_or_edited_model_folder_file_is_one_clear_error(root):
    from tagbeam import export as model_files

    model_dir = storage.join(root, "runs", "r1", "model")
    export = storage.join(model_dir, "export", "1")
    storage.write_text(model_files.asset_path(export, model_files.LABELS_TXT), "a\nb\n")
    storage.write_text(model_files.asset_path(export, model_files.THRESHOLDS_JSON),
                       model_files.thresholds_json(["a", "b"], [0.5, 0.4]))
    storage.write_json(storage.join(model_dir, model_files.RUN_JSON), {"flags": {}, "export_path": export})
    assert model_files.read_labels(export) == ["a", "b"]
    assert model_files.read_thresholds(export) == (["a", "b"], [0.5, 0.4])
    assert model_files.read_run_info(model_dir).export_path == export
    for name, content, where in ((model_files.THRESHOLDS_JSON, '{"thresholds": {"a": 0.5, "b"', export),
                                 (model_files.THRESHOLDS_JSON, '{"thresholds": ["a"]}', export),
                                 (model_files.LABELS_TXT, "\n", export),
                                 (model_files.RUN_JSON, '{"flags": {}, "export_pa', model_dir)):
        path = model_files.asset_path(where, name) if where == export else storage.join(where, name)
        saved = storage.read_bytes(path)
        storage.write_text(path, content)
        with pytest.raises(StateError) as err:
            (model_files.read_run_info(model_dir) if name == model_files.RUN_JSON else
             model_files.read_thresholds(export) if name == model_files.THRESHOLDS_JSON else
             model_files.read_labels(export))
        assert str(err.value).startswith(path) and ("again" in str(err.value))
        storage.write_bytes(path, saved)


def test_an_unreadable_earlier_dataset_is_not_reused_and_a_night_goes_on(root, caplog):
    import logging

    workspace = Workspace(root)
    storage.write_json(storage.join(workspace.dataset_dir("r1"), "dataset.json"), {"created": "2026-01-01"})
    storage.write_text(storage.join(workspace.dataset_dir("r2"), "dataset.json"), '{"created": "2026-01-0')
    with caplog.at_level(logging.WARNING, logger="pipelines.retrain"):
        assert retrain.newest_dataset(workspace, "r3") == workspace.dataset_dir("r1")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "pipelines.retrain"]
    assert line.startswith(storage.join(workspace.dataset_dir("r2"), "dataset.json")) and "fetched again" in line
