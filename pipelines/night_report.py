"""The pages of scheduled retraining: `runs/<id>/report.html` per night and the workspace's `index.html`.

A night's page shows the decision and its reason, the data-health figures (a night the health gate
refused says so, with them) and, when the promote step ran, champion and challenger per label on the
same test examples: AP and F1 at each model's own thresholds, side by side with the deltas, the
labels that got worse highlighted. `pipelines.retrain` calls `save_comparison` from its promote step
and `write_logged` when a night ends, whatever its outcome.
"""
from __future__ import annotations

import logging
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from tagbeam import pages, storage
from tagbeam.workspace import COMPARISON_JSON, INDEX_HTML, NIGHT_REPORT_HTML, Workspace

log = logging.getLogger("pipelines.retrain")


def save_comparison(workspace: Workspace, run_id: str, examples: int, metrics: Sequence[Mapping[str, Any]]) -> None:
    """comparison.json: per label, the challenger's (metrics[0]) and the champion's (metrics[1], if any)
    support, AP and F1 at their own thresholds on the run's test split."""
    def per_label(m: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        return {name: {"support": v["support"], "ap": v["average_precision"], "f1": v["at_tuned"]["f1"]}
                for name, v in m["per_label"].items()}

    storage.write_json(storage.join(workspace.run_dir(run_id), COMPARISON_JSON), {
        "test_examples": examples, "challenger": per_label(metrics[0]),
        "champion": per_label(metrics[1]) if len(metrics) > 1 else None})


def _delta(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None else new - old


def _comparison(saved: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
    if saved is None:
        return None, "The promote step did not run this night, so there is no comparison on the test split."
    champion = saved["champion"] or {}
    rows = []
    for name, new in saved["challenger"].items():
        old = champion.get(name, {"ap": None, "f1": None})
        delta_ap, delta_f1 = _delta(new["ap"], old["ap"]), _delta(new["f1"], old["f1"])
        deltas = [d for d in (delta_ap, delta_f1) if d is not None]
        rows.append({"label": name, "support": new["support"], "champion": {"ap": old["ap"], "f1": old["f1"]},
                     "challenger": {"ap": new["ap"], "f1": new["f1"]}, "delta_ap": delta_ap, "delta_f1": delta_f1,
                     "worse": any(d < 0 for d in deltas), "better": bool(deltas) and all(d > 0 for d in deltas)})
    note = None if saved["champion"] else "There was no champion yet: the challenger's figures alone."
    return {"examples": saved["test_examples"], "rows": rows}, note


def night_page(workspace: Workspace, run_id: str, record: Mapping[str, Any]) -> str:
    decision = record.get("decision") or {}
    outcome = record.get("outcome", "unknown")
    reason = decision.get("reason") or record.get("reason") or ""
    facts = [["night", run_id], ["started", record.get("time", "")], ["steps", record.get("step", "")],
             ["outcome", outcome], ["reason", reason or "-"], ["champion before", record.get("champion_before") or "none"]]
    if decision:
        facts.append(["deciding metric", f"{decision['metric']}: challenger {decision['challenger']['value']:.4f}"
                      + (f", champion {decision['champion']['value']:.4f}" if decision.get("champion") else "")])
    if record.get("seconds") is not None:
        facts.append(["took", f"{record['seconds']} s"])
    health = record.get("health") or {}
    numbers = {**(record.get("data") or {}), **(health.get("numbers") or {})}
    figures = [[key, value] for key, value in numbers.items() if not isinstance(value, dict)]
    figures += [[f"champion's {key}", value] for key, value in (numbers.get("champion") or {}).items()]
    health_note = None
    if health and not health.get("passed", True):
        health_note = ("The data-health gate refused this night, so nothing was trained and the champion is unchanged: "
                       + "; ".join(health.get("failures", [])))
    saved = storage.read_json_if_exists(storage.join(workspace.run_dir(run_id), COMPARISON_JSON))
    comparison, comparison_note = _comparison(saved)
    if comparison is None and health_note:
        comparison_note = "No comparison: the night stopped at the data-health gate."
    return pages.render(pages.NIGHT, f"Retrain night {run_id}: {outcome}", {
        "facts": facts, "health": figures, "health_note": health_note, "comparison": comparison,
        "comparison_note": comparison_note, "index_href": f"../../{INDEX_HTML}"})


def index_page(workspace: Workspace) -> str:
    latest: dict[str, Mapping[str, Any]] = {}
    for record in workspace.history(skip_bad=True):  # a hand-edited line costs its row, not the page
        latest[record["run_id"]] = record  # a night run step by step: its last record tells its outcome
    nights = []
    for run_id, record in sorted(latest.items(), reverse=True):
        page = storage.join(workspace.run_dir(run_id), NIGHT_REPORT_HTML)
        nights.append({"id": run_id, "decision": record.get("outcome", "unknown"),
                       "reason": (record.get("decision") or {}).get("reason") or record.get("reason") or "",
                       "promoted": record.get("outcome") == "promoted",
                       "href": posixpath.join("runs", run_id, NIGHT_REPORT_HTML) if storage.exists(page) else None})
    return pages.render(pages.NIGHTS_INDEX, f"Retrain nights: {workspace.root}", {"nights": nights})


def write_logged(workspace: Workspace, run_id: str, record: Mapping[str, Any]) -> None:
    """The night's page and the index; a failure is logged, never raised (the night's outcome stands)."""
    try:
        storage.write_text(storage.join(workspace.run_dir(run_id), NIGHT_REPORT_HTML), night_page(workspace, run_id, record))
        storage.write_text(storage.join(workspace.root, INDEX_HTML), index_page(workspace))
    except Exception:  # noqa: BLE001 - a page must never change what the night did
        log.exception("could not write the night's report.html or the workspace's index.html")
