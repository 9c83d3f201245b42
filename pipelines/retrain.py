"""Scheduled retraining with a promotion gate: `python -m pipelines.retrain --help`.

One entry point for a scheduler (cron, systemd, Vertex AI Pipelines). Each run preprocesses the
current manifest into a new dataset version (reusing the champion's label vocabulary, so the label
order of the model in production never changes, and the stable hash split, so test rows stay test
rows), trains a challenger, scores challenger and champion on the same test split, and promotes the
challenger only if it clears an absolute floor and is not worse than the champion by more than a
tolerance.

Workspace layout (local or gs://):
    runs/<run_id>/dataset/   the dataset version (pipelines.preprocess output)
    runs/<run_id>/model/     the challenger (trainer.task output; export/<version>/ is the SavedModel)
    runs/<run_id>/decision.json
    champion.json            the current model: written atomically, so readers see the old or the
                             new champion, never a half-written one (models themselves are immutable)
    history.jsonl            one JSON record per run, appended, for people to read
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import posixpath
import subprocess
import sys
import time
import uuid
from typing import Any

log = logging.getLogger("pipelines.retrain")

STEPS = ("all", "preprocess", "train", "promote")
METRICS = ("macro_f1", "micro_f1", "macro_fbeta", "macro_average_precision")
CHAMPION_FILE = "champion.json"
HISTORY_FILE = "history.jsonl"
SCORING_BATCH = 64


class StepError(RuntimeError):
    """A step failed; the champion is untouched and the run is recorded as failed."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.retrain",
        description="Preprocess the current manifest, train a challenger, and promote it over the champion "
                    "only if it is good enough. Unknown flags are passed to `python -m pipelines.preprocess` "
                    "(its own flags such as --min_label_count or --image_size, and Beam options such as --runner).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--workspace", required=True, help="folder holding runs, champion.json and history.jsonl (local or gs://)")
    p.add_argument("--input", help="the current manifest (as for pipelines.preprocess --input); needed by the preprocess step")
    p.add_argument("--format", help="manifest format, as for pipelines.preprocess --format (default: auto-detect)")
    p.add_argument("--image_root", help="as for pipelines.preprocess --image_root (Planet chips folder)")
    p.add_argument("--step", choices=STEPS, default="all",
                   help="run every step, or one of them (Vertex AI Pipelines runs each on its own machine)")
    p.add_argument("--run_id", help="name of this run's folder under runs/; default: a new UTC timestamp for "
                                    "--step all/preprocess, the newest run for --step train/promote")
    train = p.add_argument_group("challenger training (passed to trainer.task)")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch_size", type=int, default=256)
    train.add_argument("--learning_rate", type=float, default=1e-3)
    train.add_argument("--hidden_units", type=int, default=0)
    train.add_argument("--loss", choices=["bce", "soft_f1"], default="bce")
    train.add_argument("--beta", type=float, default=1.0, help="F-beta of threshold tuning and of --metric macro_fbeta")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--hub_handle", default=None, help="backbone; default: the embedded MobileNetV2")
    train.add_argument("--cpu_replicas", type=int, default=1, help="MirroredStrategy replicas on a CPU-only machine")
    gate = p.add_argument_group("promotion gate")
    gate.add_argument("--metric", choices=METRICS, default="macro_f1",
                      help="test-split metric that decides; F-scores use each model's own tuned thresholds")
    gate.add_argument("--tolerance", type=float, default=0.01,
                      help="promote if challenger >= champion - tolerance")
    gate.add_argument("--min_metric", type=float, default=0.0, help="absolute floor the challenger must reach")
    gate.add_argument("--keep_versions", type=int, default=5,
                      help="runs kept under runs/ (the champion's run is always kept)")
    return p


def _join(*parts: str) -> str:
    return posixpath.join(*parts) if parts[0].startswith("gs://") else os.path.join(*parts)


def _gfile():
    import tensorflow as tf  # lazily: --help and the preprocess step do not need TensorFlow here

    return tf.io.gfile


def _read_json(path: str) -> dict | None:
    gfile = _gfile()
    if not gfile.exists(path):
        return None
    with gfile.GFile(path) as f:
        return json.load(f)


def _write_atomically(path: str, text: str) -> None:
    """Local: write a sibling temp file and rename over (atomic on POSIX). GCS: one object upload
    is already atomic - readers see the old or the new object."""
    gfile = _gfile()
    if path.startswith("gs://"):
        with gfile.GFile(path, "w") as f:
            f.write(text)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append_history(workspace: str, record: dict) -> None:
    # GCS has no append: rewrite the (small) file as one atomic object.
    path = _join(workspace, HISTORY_FILE)
    gfile = _gfile()
    old = ""
    if gfile.exists(path):
        with gfile.GFile(path) as f:
            old = f.read()
    _write_atomically(path, old + json.dumps(record, sort_keys=True) + "\n")


def _runs(workspace: str) -> list[str]:
    root = _join(workspace, "runs")
    gfile = _gfile()
    if not gfile.exists(root):
        return []
    return sorted(name.rstrip("/") for name in gfile.listdir(root))


def _new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:4]


def _subprocess(step: str, argv: list[str]) -> None:
    log.info("[%s] %s", step, " ".join(argv))
    started = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", *argv])
    if code != 0:
        raise StepError(f"step {step} failed with exit code {code} (its own error is printed above)")
    log.info("[%s] done in %.0f s", step, time.perf_counter() - started)


def preprocess_step(args: argparse.Namespace, run_dir: str, champion: dict | None, extra: list[str]) -> None:
    if not args.input:
        raise StepError("--input is required for the preprocess step (the current manifest)")
    argv = ["pipelines.preprocess", "--input", args.input, "--output", _join(run_dir, "dataset"), "--overwrite"]
    for flag in ("format", "image_root"):
        if getattr(args, flag):
            argv += [f"--{flag}", getattr(args, flag)]
    if champion:
        # The champion's vocabulary keeps label order (and so the model's output columns) stable.
        argv += ["--vocab_file", champion["labels_file"]]
    _subprocess("preprocess", argv + extra)


def train_step(args: argparse.Namespace, run_dir: str) -> None:
    argv = ["trainer.task", "--data_dir", _join(run_dir, "dataset"), "--model_dir", _join(run_dir, "model")]
    for flag in ("epochs", "batch_size", "learning_rate", "hidden_units", "loss", "beta", "seed", "hub_handle",
                 "cpu_replicas"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag}", str(value)]
    _subprocess("train", argv)


def _load_servable(export_dir: str, labels: list[str]) -> tuple[Any, Any]:
    """(serving signature, tuned thresholds) of an export, after checking it predicts `labels`."""
    import tensorflow as tf

    from trainer.thresholds import thresholds_from_json

    with tf.io.gfile.GFile(_join(export_dir, "assets", "labels.txt")) as f:
        model_labels = [line.rstrip("\n") for line in f if line.strip()]
    if model_labels != labels:
        raise StepError(f"{export_dir} predicts labels {model_labels}, the dataset has {labels}: "
                        "they cannot be compared on the same test split")
    with tf.io.gfile.GFile(_join(export_dir, "assets", "thresholds.json")) as f:
        _, thresholds = thresholds_from_json(f.read())
    return tf.saved_model.load(export_dir).signatures["serving_default"], thresholds


def score_exports(data_dir: str, export_dirs: list[str], beta: float) -> tuple[int, list[dict]]:
    """Runs each served model on the stored images of the test split, streaming it in batches, and
    returns (examples, trainer.evaluation metrics per model at that model's own thresholds)."""
    import numpy as np
    import tensorflow as tf

    from trainer import data
    from trainer.evaluation import evaluate

    info = data.read_dataset_info(data_dir)
    split = info.split("test")
    if split.examples == 0:
        raise StepError(f"the test split of {data_dir} is empty: challenger and champion cannot be compared "
                        "(raise --test_fraction)")
    labels = list(info.labels)
    servables = [_load_servable(export_dir, labels) for export_dir in export_dirs]
    spec = {"image": tf.io.FixedLenFeature([], tf.string),
            "labels": tf.io.FixedLenFeature([info.num_labels], tf.int64)}
    records = (tf.data.TFRecordDataset(list(split.files), compression_type=info.compression_type)
               .map(lambda record: tf.io.parse_single_example(record, spec)).batch(SCORING_BATCH))
    truth, probs = [], [[] for _ in servables]
    for batch in records:
        truth.append(batch["labels"].numpy())
        for k, (serve, _) in enumerate(servables):
            probs[k].append(serve(image_bytes=batch["image"])["probabilities"].numpy())
    y_true = np.concatenate(truth)
    return len(y_true), [evaluate(y_true, np.concatenate(p), labels, thresholds, beta)
                         for p, (_, thresholds) in zip(probs, servables)]


def gate_value(metrics: dict, metric: str) -> float:
    if metric == "macro_average_precision":
        return float(metrics["macro_average_precision"] or 0.0)
    return float(metrics["at_tuned"][metric])


def decide(challenger: float, champion: float | None, tolerance: float, floor: float) -> tuple[bool, str]:
    """The promotion rule, kept apart so it reads in one place."""
    if challenger < floor:
        return False, f"challenger {challenger:.4f} is below the floor --min_metric {floor:.4f}"
    if champion is None:
        return True, f"no champion yet and challenger {challenger:.4f} >= floor {floor:.4f}"
    if challenger < champion - tolerance:
        return False, (f"challenger {challenger:.4f} is worse than champion {champion:.4f} "
                       f"by more than --tolerance {tolerance:.4f}")
    return True, f"challenger {challenger:.4f} >= champion {champion:.4f} - tolerance {tolerance:.4f}"


def promote_step(args: argparse.Namespace, run_id: str, run_dir: str, champion: dict | None) -> dict:
    """Scores both models on this run's test split and moves champion.json if the gate passes."""
    run_info = _read_json(_join(run_dir, "model", "run.json"))
    if not run_info or not run_info.get("export_path"):
        raise StepError(f"{run_dir}/model has no finished training run (run.json with export_path): run the train step")
    exports = [run_info["export_path"]] + ([champion["export_path"]] if champion else [])
    examples, metrics = score_exports(_join(run_dir, "dataset"), exports, args.beta)
    challenger_metrics = metrics[0]
    challenger = gate_value(challenger_metrics, args.metric)
    champion_value, champion_metrics = None, None
    if champion:
        champion_metrics = metrics[1]
        champion_value = gate_value(champion_metrics, args.metric)
    promote, reason = decide(challenger, champion_value, args.tolerance, args.min_metric)
    decision = {
        "run_id": run_id,
        "metric": args.metric,
        "test_examples": examples,
        "challenger": {"export_path": run_info["export_path"], "value": challenger,
                       "macro_f1": challenger_metrics["at_tuned"]["macro_f1"],
                       "macro_average_precision": challenger_metrics["macro_average_precision"]},
        "champion": None if not champion else {
            "run_id": champion["run_id"], "export_path": champion["export_path"], "value": champion_value,
            "macro_f1": champion_metrics["at_tuned"]["macro_f1"],
            "macro_average_precision": champion_metrics["macro_average_precision"]},
        "promoted": promote,
        "reason": reason,
    }
    _write_atomically(_join(run_dir, "decision.json"), json.dumps(decision, indent=2) + "\n")
    if promote:
        new_champion = {
            "run_id": run_id,
            "export_path": run_info["export_path"],
            "labels_file": _join(run_dir, "model", "labels.txt"),
            "metric": args.metric,
            "value": challenger,
            "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _write_atomically(_join(args.workspace, CHAMPION_FILE), json.dumps(new_champion, indent=2) + "\n")
    log.info("[promote] %s: %s", "PROMOTED" if promote else "refused", reason)
    return decision


def prune_runs(workspace: str, keep: int, champion_run: str | None) -> list[str]:
    """Deletes all but the newest `keep` runs; the champion's run is never deleted."""
    names = _runs(workspace)
    doomed = [n for n in names[: max(0, len(names) - keep)] if n != champion_run]
    for name in doomed:
        _gfile().rmtree(_join(workspace, "runs", name))
    return doomed


def _dataset_counts(run_dir: str) -> dict | None:
    meta = _read_json(_join(run_dir, "dataset", "dataset.json"))
    if not meta:
        return None
    return {"input_rows": meta["input_rows"], "rejected": meta["rejected"],
            "examples": {name: split["examples"] for name, split in meta["splits"].items()}}


def run(args: argparse.Namespace, extra: list[str]) -> int:
    gfile = _gfile()
    gfile.makedirs(_join(args.workspace, "runs"))
    run_id = args.run_id
    if run_id is None:
        existing = _runs(args.workspace)
        if args.step in ("train", "promote"):
            if not existing:
                raise StepError(f"no runs under {args.workspace}/runs: run --step preprocess first or pass --run_id")
            run_id = existing[-1]
        else:
            run_id = _new_run_id()
    run_dir = _join(args.workspace, "runs", run_id)
    champion = _read_json(_join(args.workspace, CHAMPION_FILE))
    started = dt.datetime.now(dt.timezone.utc)
    record: dict[str, Any] = {"time": started.isoformat(timespec="seconds"), "run_id": run_id, "step": args.step,
                              "input": args.input, "champion_before": champion and champion["run_id"]}
    steps = ("preprocess", "train", "promote") if args.step == "all" else (args.step,)
    try:
        for step in steps:
            if step == "preprocess":
                preprocess_step(args, run_dir, champion, extra)
                record["data"] = _dataset_counts(run_dir)
            elif step == "train":
                train_step(args, run_dir)
            else:
                record["decision"] = promote_step(args, run_id, run_dir, champion)
    except Exception as e:  # noqa: BLE001 - every failure must be recorded before exiting non-zero
        if not isinstance(e, StepError):
            log.exception("unexpected failure")
        record.update(outcome="failed", reason=f"{type(e).__name__}: {e}")
        _append_history(args.workspace, record)
        print(f"error: {e}; the champion is unchanged", file=sys.stderr)
        return 1
    record["outcome"] = "promoted" if record.get("decision", {}).get("promoted") else (
        "refused" if "decision" in record else "step done")
    if "promote" in steps:
        current = _read_json(_join(args.workspace, CHAMPION_FILE))
        record["pruned"] = prune_runs(args.workspace, args.keep_versions, current and current["run_id"])
    record["seconds"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)
    _append_history(args.workspace, record)
    return 0


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.keep_versions < 1:
        print("error: --keep_versions must be >= 1 (the champion's run is always kept)", file=sys.stderr)
        return 2
    try:
        return run(args, extra)
    except StepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
