"""The data-health gate of `pipelines.retrain`: a new dataset is compared with the champion's before
anything trains on it.

A scheduled run trusts the night's data otherwise: when many image URLs start failing, the test
split shrinks the same way as the training data and the promotion gate, which compares models on
that split, can still pass. So each check compares the new dataset with the one the champion was
trained on:
- the share of rejected input rows may rise by at most --max_rejected_rise;
- the examples may fall by at most --max_examples_drop (a fraction of the champion's);
- each label with at least --health_min_label_examples examples in the champion's dataset may lose
  at most --max_label_drop of them; one that vanished is reported as such.
A failed check stops the run before training; the report (which check, the numbers) goes into
runs/<id>/health.json and history.jsonl. Setting a bound to 1 turns its check off.
"""
from __future__ import annotations

from typing import Any

from tagbeam.dataset import DatasetInfo
from tagbeam.flags import fraction, group, option, positive


@group
class HealthOptions:
    """Data-health gate: the new dataset against the champion's, before training."""

    # A night where 10 % of the image hosts fail is already a night to look at, not to train on.
    max_rejected_rise: float = option(0.05, check=fraction,
                                      help="the share of rejected rows may rise by at most this much over the "
                                           "champion's dataset")
    max_examples_drop: float = option(0.2, check=fraction,
                                      help="the examples may fall by at most this fraction of the champion's")
    max_label_drop: float = option(0.5, check=fraction,
                                   help="a label may lose at most this fraction of its examples (labels with at least "
                                        "--health_min_label_examples in the champion's dataset)")
    min_label_examples: int = option(20, flag="health_min_label_examples", check=positive,
                                     help="labels with fewer examples in the champion's dataset are not checked "
                                          "(their counts are noise)")


def _rejected_share(info: DatasetInfo) -> float:
    return info.rejected / info.input_rows if info.input_rows else 0.0


def check(new: DatasetInfo, champion: DatasetInfo | None, options: HealthOptions) -> dict[str, Any]:
    """The gate's report: {"passed", "failures": [readable lines], "numbers": {...}}."""
    numbers: dict[str, Any] = {"rejected_share": round(_rejected_share(new), 4), "examples": new.examples,
                               "input_rows": new.input_rows}
    if champion is None:
        return {"passed": True, "failures": [], "numbers": numbers, "note": "no champion to compare with"}
    before = {"rejected_share": round(_rejected_share(champion), 4), "examples": champion.examples}
    numbers["champion"] = before
    failures = []
    rise = _rejected_share(new) - _rejected_share(champion)
    if rise > options.max_rejected_rise:
        failures.append(f"rejected share {_rejected_share(new):.3f} vs {_rejected_share(champion):.3f} in the "
                        f"champion's dataset: a rise of {rise:.3f} > --max_rejected_rise {options.max_rejected_rise:g} "
                        f"(top reasons: {_top_reasons(new)})")
    if champion.examples:
        drop = 1 - new.examples / champion.examples
        if drop > options.max_examples_drop:
            failures.append(f"examples {new.examples} vs {champion.examples} in the champion's dataset: a drop of "
                            f"{drop:.3f} > --max_examples_drop {options.max_examples_drop:g}")
    old_counts, new_counts = _label_totals(champion), _label_totals(new)
    vanished, fallen = [], []
    for label, old in old_counts.items():
        if old < options.min_label_examples:
            continue
        now = new_counts.get(label, 0)
        if now == 0:
            vanished.append(f"{label} ({old} -> 0)")
        elif 1 - now / old > options.max_label_drop:
            fallen.append(f"{label} ({old} -> {now})")
    if vanished and options.max_label_drop < 1:
        failures.append(f"labels that vanished: {', '.join(vanished)}")
    if fallen:
        failures.append(f"labels that lost more than --max_label_drop {options.max_label_drop:g} of their examples: "
                        f"{', '.join(fallen)}")
    numbers["labels_vanished"] = len(vanished)
    numbers["labels_fallen"] = len(fallen)
    return {"passed": not failures, "failures": failures, "numbers": numbers}


def _label_totals(info: DatasetInfo) -> dict[str, int]:
    totals: dict[str, int] = {}
    for split in info.splits.values():
        for label, n in split.label_counts.items():
            totals[label] = totals.get(label, 0) + n
    return totals


def _top_reasons(info: DatasetInfo, top: int = 3) -> str:
    ranked = sorted(info.rejected_by_reason.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{reason} {n}" for reason, n in ranked) or "none"
