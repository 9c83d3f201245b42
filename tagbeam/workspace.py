"""The retraining workspace of `pipelines.retrain` (local or gs://), read by `pipelines.predict`:

    runs/<run_id>/options.json   the run's retrain flags, recorded by its first step so that the
                                 later steps (on other machines, under Vertex AI Pipelines) use them
    runs/<run_id>/dataset/       the dataset version (pipelines.preprocess output)
    runs/<run_id>/model/         the challenger (trainer.task output)
    runs/<run_id>/health.json    the data-health gate's report (pipelines/health.py)
    runs/<run_id>/decision.json  the promotion decision
    runs/<run_id>/comparison.json  champion and challenger per label on the run's test split
    runs/<run_id>/report.html    the night's page (pipelines/night_report.py)
    index.html                   every night with its decision, linking each night's page
    features/                    backbone features of stored images, shared by the runs (trainer/features.py)
    champion.json                the current model, replaced atomically and only by a compare-and-swap
    history.jsonl                one JSON record per run (or skipped run), for people; appended whole
    workspace.lease              the run holding the workspace, while it holds it (tagbeam/lease.py)

Files refer to the workspace's own files relative to it (`runs/<id>/model/...`), so a workspace can
be copied, moved or synced to another bucket and keep using its own models; absolute paths that
older versions wrote are read as the same relative ones.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from tagbeam import export as model_files
from tagbeam import storage

RUNS_DIR = "runs"
CHAMPION_JSON = "champion.json"
HISTORY_JSONL = "history.jsonl"
RUN_OPTIONS_JSON = "options.json"
DECISION_JSON = "decision.json"
HEALTH_JSON = "health.json"
COMPARISON_JSON = "comparison.json"
NIGHT_REPORT_HTML = "report.html"
INDEX_HTML = "index.html"
RUN_DATASET_DIR = "dataset"
RUN_MODEL_DIR = "model"
FEATURES_DIR = "features"
LEASE_FILE = "workspace.lease"
RESTORE_CHAMPION = "--restore_champion"  # pipelines.retrain's flag that rebuilds champion.json from history.jsonl
PROMOTED = "promoted"  # a history record's outcome when its challenger became the champion

log = logging.getLogger(__name__)

StateError = storage.BadFile  # a workspace file that cannot be used: one `error:` line says which and what to do


def relative(root: str, path: str) -> str:
    """`path` as the workspace files record it: relative to the workspace when it is inside it. An
    absolute path into some workspace's runs/ (written by an older version, perhaps in the workspace
    this one was copied from) names this workspace's own run folder."""
    prefix = root.rstrip("/") + "/"
    if path.startswith(prefix):
        return path[len(prefix):]
    marker = f"/{RUNS_DIR}/"
    if (storage.is_remote(path) or os.path.isabs(path)) and marker in path:
        return RUNS_DIR + "/" + path.rsplit(marker, 1)[1]
    return path


def absolute(root: str, path: str) -> str:
    """A path read from a workspace file, as a path to open."""
    return path if storage.is_remote(path) or os.path.isabs(path) else storage.join(root, path)


@dataclasses.dataclass(frozen=True)
class Champion:
    """champion.json: the model in production. Models are immutable; only this file moves."""

    run_id: str
    export_path: str
    labels_file: str  # its labels.txt: the next run's --vocab_file, so label order never changes
    metric: str
    value: float
    promoted_at: str

    def to_json(self, root: str) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "export_path": relative(root, self.export_path),
                "labels_file": relative(root, self.labels_file)}

    @classmethod
    def from_json(cls, meta: Mapping[str, Any], root: str) -> Champion:
        """From champion.json, with its paths resolved in the workspace at `root`."""
        fields = {f.name: meta[f.name] for f in dataclasses.fields(cls)}
        for key in ("export_path", "labels_file"):
            fields[key] = absolute(root, relative(root, fields[key]))
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class Workspace:
    root: str

    def run_dir(self, run_id: str) -> str:
        return storage.join(self.root, RUNS_DIR, run_id)

    def dataset_dir(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), RUN_DATASET_DIR)

    def model_dir(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), RUN_MODEL_DIR)

    def run_options(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), RUN_OPTIONS_JSON)

    def decision(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), DECISION_JSON)

    def health(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), HEALTH_JSON)

    @property
    def features_dir(self) -> str:
        return storage.join(self.root, FEATURES_DIR)

    @property
    def champion_file(self) -> str:
        return storage.join(self.root, CHAMPION_JSON)

    @property
    def history_file(self) -> str:
        return storage.join(self.root, HISTORY_JSONL)

    @property
    def lease_file(self) -> str:
        return storage.join(self.root, LEASE_FILE)

    def champion(self) -> Champion | None:
        return self.champion_versioned()[0]

    @property
    def restore_hint(self) -> str:
        return (f"rebuild it from history.jsonl with `python -m pipelines.retrain --workspace {self.root} "
                f"{RESTORE_CHAMPION}` (or delete it to let the next run promote without a champion)")

    def champion_versioned(self) -> tuple[Champion | None, str]:
        """The champion and the version of champion.json it was read from, for replace_champion.
        Raises StateError if champion.json is unreadable: never promote over a champion unseen."""
        data, version = storage.read_versioned(self.champion_file)
        if data is None:
            return None, version
        meta = storage.parse_state_json(self.champion_file, data, self.restore_hint,
                                        tuple(f.name for f in dataclasses.fields(Champion)))
        return Champion.from_json(meta, self.root), version

    def replace_champion(self, champion: Champion, version: str) -> bool:
        """Compare-and-swap: writes champion.json only if it still is at `version` (what the caller
        compared with); False if another run replaced it meanwhile."""
        text = json.dumps(champion.to_json(self.root), indent=2) + "\n"
        return storage.write_if_version(self.champion_file, text.encode("utf-8"), version) is not None

    def runs(self) -> list[str]:
        """Run ids, oldest first (they start with a UTC timestamp)."""
        prefix = storage.join(self.root, RUNS_DIR, "")
        # "**": object stores have no folder entries, only the objects under them.
        found = storage.match(prefix + "**")
        return sorted({path[len(prefix):].split("/", 1)[0] for path in found if path.startswith(prefix)} - {""})

    def append_history(self, record: Mapping[str, Any]) -> None:
        # Whole lines under concurrent writers, also runs that found the workspace held.
        storage.append_line(self.history_file, json.dumps(record, sort_keys=True, default=str))

    def history(self, skip_bad: bool = False) -> list[dict[str, Any]]:
        """The records of history.jsonl. A record cut short (a writer killed mid-line: no closing
        brace; appends start a new line after it) is left out; any other unreadable line raises
        StateError, or is logged and left out with `skip_bad`."""
        if not storage.exists(self.history_file):
            return []
        text = storage.read_bytes(self.history_file).decode("utf-8", errors="replace")
        lines = text.split("\n")
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, not an object")
            except ValueError as err:
                if not line.rstrip().endswith("}"):
                    log.info("%s line %d: a record cut short, left out", self.history_file, number)
                    continue
                problem = f"{self.history_file} line {number} is not a JSON record ({err})"
                if not skip_bad:
                    raise StateError(f"{problem}: fix or delete that line (history.jsonl is for people; "
                                     "no run reads it but the champion's rebuild)") from None
                log.warning("%s: left out", problem)
                continue
            records.append(record)
        return records

    def champion_from_history(self) -> Champion | None:
        """The champion as history.jsonl last recorded it: the newest promotion whose model is still
        in the workspace; None if there is none."""
        for record in reversed(self.history(skip_bad=True)):
            decision = record.get("decision") or {}
            challenger = decision.get("challenger") or {}
            if record.get("outcome") != PROMOTED or not challenger.get("export_path"):
                continue
            run_id = record["run_id"]
            export_path = absolute(self.root, relative(self.root, challenger["export_path"]))
            if not storage.exists(storage.join(export_path, model_files.SAVED_MODEL_PB)):
                log.warning("history.jsonl: run %s was promoted but its model %s is gone", run_id, export_path)
                continue
            return Champion(run_id=run_id, export_path=export_path,
                            labels_file=storage.join(self.model_dir(run_id), model_files.LABELS_TXT),
                            metric=decision.get("metric", ""), value=float(challenger.get("value") or 0.0),
                            promoted_at=record.get("time", ""))
        return None
