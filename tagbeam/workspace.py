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
    champion.json                the current model, replaced atomically
    history.jsonl                one JSON record per run, for people
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
COMPARISON_JSON = "comparison.json"
NIGHT_REPORT_HTML = "report.html"
INDEX_HTML = "index.html"
RUN_DATASET_DIR = "dataset"
RUN_MODEL_DIR = "model"
FEATURES_DIR = "features"


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

    def champion(self) -> Champion | None:
        meta = storage.read_json_if_exists(self.champion_file)
        return Champion.from_json(meta) if meta else None

    def set_champion(self, champion: Champion) -> None:
        storage.write_json(self.champion_file, champion.to_json())

    def runs(self) -> list[str]:
        """Run ids, oldest first (they start with a UTC timestamp)."""
        prefix = storage.join(self.root, RUNS_DIR, "")
        # "**": object stores have no folder entries, only the objects under them.
        found = storage.match(prefix + "**")
        return sorted({path[len(prefix):].split("/", 1)[0] for path in found if path.startswith(prefix)} - {""})

    def append_history(self, record: Mapping[str, Any]) -> None:
        # Object stores have no append: rewrite the (small) file as one atomic object.
        old = storage.read_text(self.history_file) if storage.exists(self.history_file) else ""
        storage.write_text(self.history_file, old + json.dumps(record, sort_keys=True) + "\n")

    def history(self) -> list[dict[str, Any]]:
        if not storage.exists(self.history_file):
            return []
        return [json.loads(line) for line in storage.read_text(self.history_file).splitlines() if line.strip()]
