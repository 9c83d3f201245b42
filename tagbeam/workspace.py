"""The retraining workspace of `pipelines.retrain` (local or gs://), read by `pipelines.predict`:

    runs/<run_id>/options.json   the run's retrain flags, recorded by its first step so that the
                                 later steps (on other machines, under Vertex AI Pipelines) use them
    runs/<run_id>/dataset/       the dataset version (pipelines.preprocess output)
    runs/<run_id>/model/         the challenger (trainer.task output)
    runs/<run_id>/health.json    the data-health gate's report (pipelines/health.py)
    runs/<run_id>/decision.json  the promotion decision
    features/                    backbone features of stored images, shared by the runs (trainer/features.py)
    champion.json                the current model, replaced atomically and only by a compare-and-swap
    history.jsonl                one JSON record per run (or skipped run), for people; appended whole
    workspace.lease              the run holding the workspace, while it holds it (tagbeam/lease.py)
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from tagbeam import storage

RUNS_DIR = "runs"
CHAMPION_JSON = "champion.json"
HISTORY_JSONL = "history.jsonl"
RUN_OPTIONS_JSON = "options.json"
DECISION_JSON = "decision.json"
HEALTH_JSON = "health.json"
RUN_DATASET_DIR = "dataset"
RUN_MODEL_DIR = "model"
FEATURES_DIR = "features"
LEASE_FILE = "workspace.lease"


@dataclasses.dataclass(frozen=True)
class Champion:
    """champion.json: the model in production. Models are immutable; only this file moves."""

    run_id: str
    export_path: str
    labels_file: str  # its labels.txt: the next run's --vocab_file, so label order never changes
    metric: str
    value: float
    promoted_at: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> "Champion":
        return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls)})


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

    def champion_versioned(self) -> tuple[Champion | None, str]:
        """The champion and the version of champion.json it was read from, for replace_champion."""
        data, version = storage.read_versioned(self.champion_file)
        return (Champion.from_json(json.loads(data)) if data else None), version

    def replace_champion(self, champion: Champion, version: str) -> bool:
        """Compare-and-swap: writes champion.json only if it still is at `version` (what the caller
        compared with); False if another run replaced it meanwhile."""
        text = json.dumps(champion.to_json(), indent=2) + "\n"
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

    def history(self) -> list[dict[str, Any]]:
        if not storage.exists(self.history_file):
            return []
        return [json.loads(line) for line in storage.read_text(self.history_file).splitlines() if line.strip()]
