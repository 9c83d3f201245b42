"""Scheduled retraining with a promotion gate: `python -m pipelines.retrain --help`.

One entry point for a scheduler (cron, systemd, Vertex AI Pipelines). Each run preprocesses the
current manifest into a new dataset version (reusing the champion's label vocabulary, so the label
order of the model in production never changes, the stable hash split, so test rows stay test rows,
and the stored images of the newest earlier dataset for rows whose source is unchanged, so a night
costs what its new data costs: pipelines/reuse.py), checks the new data against the champion's
(pipelines/health.py: a night of failing fetches stops here), trains a challenger, scores
challenger and champion on the same test split, and promotes the challenger only if it clears an
absolute floor and is not worse than the champion by more than a tolerance.

It declares no option of the steps it runs: it takes every option of `pipelines.preprocess`
(pipelines/options.py) and of `trainer.task` (trainer/config.py) from their own declarations and
forwards what the user gave, so a default changed there is changed here. The workspace layout is
tagbeam/workspace.py.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from pipelines import cli, health, night_report, runners
from pipelines.fetch import FetchOptions
from pipelines.health import HealthOptions
from pipelines.images import ImageOptions
from pipelines.manifests import ManifestOptions
from pipelines.options import LabelOptions, SplitOptions
from pipelines.reuse import ReuseOptions
from tagbeam import console, dataset, flags, storage
from tagbeam import export as model_files
from tagbeam import lease as leases
from tagbeam.dataset import DATASET_JSON
from tagbeam.flags import UsageError, at_least, group, option, positive
from tagbeam.workspace import PROMOTED, RESTORE_CHAMPION, Champion, StateError, Workspace, relative
from trainer.config import TrainOptions

log = logging.getLogger("pipelines.retrain")

ENTRY_POINT = "pipelines.retrain"
STEPS = ("all", "preprocess", "check", "train", "promote")
IF_HELD = ("skip", "wait", "fail")
PROMOTE_ATTEMPTS = 5  # comparisons with a champion that keeps changing before the run gives up
METRICS = ("macro_f1", "micro_f1", "macro_fbeta", "macro_average_precision")
SCORING_BATCH = 64
PREPROCESS = "pipelines.preprocess"
TRAINER = "trainer.task"


@group
class RetrainOptions:
    """Retraining: the workspace, the step and the promotion gate."""

    workspace: str = option(help="folder holding runs/, champion.json and history.jsonl (local or gs://)")
    step: str = option("all", choices=STEPS,
                       help="run every step, or one of them (Vertex AI Pipelines runs each on its own machine); a "
                            "later step runs with the flags its run's first step recorded, plus its own")
    run_id: str | None = option(None, help="name of this run's folder under runs/; default: a new UTC timestamp for "
                                           "--step all/preprocess, the newest run for --step train/promote")
    metric: str = option("macro_f1", choices=METRICS,
                         help="test-split metric that decides; F-scores use each model's own tuned thresholds "
                              "(and trainer.task's --beta)")
    tolerance: float = option(0.01, check=at_least(0), help="promote if challenger >= champion - tolerance")
    min_metric: float = option(0.0, help="absolute floor the challenger must reach")
    keep_versions: int = option(5, check=positive, help="runs kept under runs/ (the champion's run is always kept)")
    full_rebuild: bool = option(False, help="fetch and decode every image again instead of reusing the stored images "
                                            "of the workspace's newest dataset for unchanged sources")
    if_held: str = option("skip", choices=IF_HELD,
                          help="when another live run holds the workspace: skip (exit 0; right for cron, the "
                               "running night promotes), wait (up to --held_wait_s, then exit 1), or fail "
                               "(exit 1); history.jsonl records it with the holder's run id")
    held_wait_s: float = option(3600.0, check=positive, help="--if_held wait: how long to wait for the workspace")
    restore_champion: bool = option(False, help="rebuild champion.json from history.jsonl (its newest promotion whose "
                                                "model is still in the workspace), e.g. after it was cut short or "
                                                "hand-edited, and exit; nothing is trained")
    flags_json: str | None = option(None, help="more arguments of this command as a JSON list of strings, for "
                                               "orchestrators that pass one string (Vertex AI Pipelines)")


class StepError(RuntimeError):
    """A step failed; the champion is untouched and the run is recorded as failed."""


@dataclasses.dataclass(frozen=True)
class RetrainJob:
    """The option groups: its own, and those of the steps it runs, forwarded as given. --output,
    --overwrite, --vocab_file and --reuse_dataset are the run's own (its dataset folder, the
    champion's label order, the newest earlier dataset)."""

    retrain: RetrainOptions
    health: HealthOptions
    manifest: ManifestOptions = flags.part(to=PREPROCESS, not_required=("input",))
    labels: LabelOptions = flags.part(to=PREPROCESS, exclude=("vocab_file",))
    image: ImageOptions = flags.part(to=PREPROCESS)
    fetch: FetchOptions = flags.part(to=PREPROCESS)
    splits: SplitOptions = flags.part(to=PREPROCESS)
    reuse: ReuseOptions = flags.part(to=PREPROCESS, exclude=("reuse_dataset",))
    train: TrainOptions = flags.part(to=TRAINER, title=f"{TRAINER}: training")
    beam_args: tuple[str, ...]  # Beam pipeline options, for the preprocess step
    argv: tuple[str, ...]  # as given (with --flags_json expanded), recorded for the run's later steps

    def forwarded(self, entry_point: str) -> list[str]:
        """The flags of every option group this job forwards to `entry_point`, as the user gave them."""
        return [arg for p in flags.parts(type(self)) if p.to == entry_point for arg in flags.to_argv(getattr(self, p.name))]


def build_parser() -> flags.Parser:
    p = flags.Parser(prog=f"python -m {ENTRY_POINT}", description=__doc__.split("\n\n")[0],
                     epilog="Options of pipelines.preprocess and trainer.task are forwarded to them; any other "
                            "argument must be one of Beam's pipeline options (forwarded to the preprocess step).")
    flags.add_job_options(p, RetrainJob)
    return p


def _expand(argv: Sequence[str]) -> list[str]:
    """argv with every --flags_json replaced by the arguments it holds."""
    out, args = [], list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name != "--flags_json":
            out.append(arg)
            continue
        text = value if eq else (args.pop(0) if args else "")
        try:
            more = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"--flags_json is not JSON ({err}): give a JSON list of strings") from None
        if not isinstance(more, list) or not all(isinstance(a, str) for a in more):
            raise UsageError(f"--flags_json must be a JSON list of strings, got {text[:80]!r}")
        out += more
    return out


def parse_args(argv: Sequence[str] | None) -> RetrainJob:
    """Every option, checked against its own declaration; anything else must be a Beam option."""
    parser = build_parser()
    try:
        given = _expand(sys.argv[1:] if argv is None else argv)
        namespace, beam_args = flags.parse_with_beam(parser, given, ENTRY_POINT)
        return RetrainJob(**flags.build_parts(RetrainJob, namespace), beam_args=tuple(beam_args), argv=tuple(given))
    except UsageError as err:
        parser.error(str(err))


def _with_recorded_options(job: RetrainJob, workspace: Workspace, run_id: str) -> RetrainJob:
    """A later step (train, promote) runs with the flags its run's first step recorded, then its own."""
    recorded = storage.read_state_json(workspace.run_options(run_id),
                                       f"run {run_id}'s first step recorded its flags there; start the run again "
                                       "from --step preprocess (with a new --run_id)", ("argv",))
    if not recorded:
        return job
    return parse_args([*recorded["argv"], *job.argv])


def _new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:4]


def _subprocess(step: str, argv: list[str]) -> None:
    log.info("[%s] %s", step, " ".join(argv))
    started = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", *argv])
    if code != 0:
        raise StepError(f"step {step} failed with exit code {code} (its own error is printed above)")
    log.info("[%s] done in %.0f s", step, time.perf_counter() - started)


def newest_dataset(workspace: Workspace, run_id: str) -> str | None:
    """The most recently written complete dataset of another run: the one most like tonight's data
    (by dataset.json's `created`, so run ids of any form order right)."""
    written = []
    for other in workspace.runs():
        try:
            meta = storage.read_state_json(storage.join(workspace.dataset_dir(other), DATASET_JSON),
                                           "not reused: its images are fetched again")
        except StateError as err:  # only a source of images to reuse, like a cache entry: a miss
            log.warning("%s", err)
            continue
        if other != run_id and meta:
            written.append((meta.get("created", ""), other))
    return workspace.dataset_dir(max(written)[1]) if written else None


def preprocess_argv(job: RetrainJob, workspace: Workspace, run_id: str, champion: Champion | None) -> list[str]:
    argv = [PREPROCESS, "--output", workspace.dataset_dir(run_id), "--overwrite", *job.forwarded(PREPROCESS)]
    if champion:
        # The champion's vocabulary keeps label order (and so the model's output columns) stable.
        argv += ["--vocab_file", champion.labels_file]
    previous = None if job.retrain.full_rebuild else newest_dataset(workspace, run_id)
    if previous:
        argv += ["--reuse_dataset", previous]
    return argv + list(job.beam_args)


def train_argv(job: RetrainJob, workspace: Workspace, run_id: str) -> list[str]:
    argv = [TRAINER, "--data_dir", workspace.dataset_dir(run_id), "--model_dir", workspace.model_dir(run_id),
            *job.forwarded(TRAINER)]
    if job.train.feature_store is None:
        # Shared by the workspace's runs: a night extracts backbone features for its new images only.
        argv += ["--feature_store", workspace.features_dir]
    return argv


def preprocess_step(job: RetrainJob, workspace: Workspace, run_id: str, champion: Champion | None) -> None:
    if not job.manifest.input:
        raise StepError("--input is required for the preprocess step (the current manifest)")
    storage.write_json(workspace.run_options(run_id), {"argv": list(job.argv)})
    _subprocess("preprocess", preprocess_argv(job, workspace, run_id, champion))


def check_step(job: RetrainJob, workspace: Workspace, run_id: str, champion: Champion | None) -> dict:
    """The data-health gate (pipelines/health.py): raises StepError, before anything trains, when the
    new dataset is too unlike the champion's."""
    new = dataset.read(workspace.dataset_dir(run_id))
    before = None
    if champion:
        champion_data = workspace.dataset_dir(champion.run_id)
        if storage.exists(storage.join(champion_data, DATASET_JSON)):
            before = dataset.read(champion_data)
        else:
            log.warning("[check] the champion's dataset %s is gone: nothing to compare with", champion_data)
    report = health.check(new, before, job.health)
    storage.write_json(workspace.health(run_id), report)
    if not report["passed"]:
        raise StepError("data health check failed, nothing was trained: " + "; ".join(report["failures"]))
    log.info("[check] passed: %s", report["numbers"])
    return report


def _load_servable(export_dir: str, labels: list[str]) -> tuple[Any, Any]:
    """(serving signature, tuned thresholds) of an export, after checking it predicts `labels`."""
    import numpy as np
    import tensorflow as tf

    model_labels = model_files.read_labels(export_dir)
    if model_labels != labels:
        raise StepError(f"{export_dir} predicts labels {model_labels}, the dataset has {labels}: "
                        "they cannot be compared on the same test split")
    named, thresholds = model_files.read_thresholds(export_dir)
    if named != model_labels:
        raise StateError(f"{model_files.asset_path(export_dir, model_files.THRESHOLDS_JSON)} has thresholds for "
                         f"{len(named)} labels that are not its labels.txt's {len(model_labels)}: export the model "
                         "again with `python -m trainer.task`")
    signature = tf.saved_model.load(export_dir).signatures[model_files.SIGNATURE_NAME]
    return signature, np.asarray(thresholds, np.float32)


def score_exports(data_dir: str, export_dirs: list[str], beta: float) -> tuple[int, list[dict]]:
    """Runs each served model on the stored images of the test split, streaming it in batches, and
    returns (examples, trainer.evaluation metrics per model at that model's own thresholds)."""
    import numpy as np
    import tensorflow as tf

    from tagbeam import dataset
    from trainer.evaluation import evaluate

    info = dataset.read(data_dir)
    split = info.split("test")
    if split.examples == 0:
        raise StepError(f"the test split of {data_dir} is empty: challenger and champion cannot be compared "
                        "(raise --test_fraction)")
    labels = list(info.labels)
    servables = [_load_servable(export_dir, labels) for export_dir in export_dirs]
    spec = {dataset.FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string),
            dataset.FEATURE_LABELS: tf.io.FixedLenFeature([info.num_labels], tf.int64)}
    records = (tf.data.TFRecordDataset(list(info.shard_paths("test")), compression_type=info.compression_type)
               .map(lambda record: tf.io.parse_single_example(record, spec)).batch(SCORING_BATCH))
    truth, probs = [], [[] for _ in servables]
    for batch in records:
        truth.append(batch[dataset.FEATURE_LABELS].numpy())
        for k, (serve, _) in enumerate(servables):
            outputs = serve(**{model_files.INPUT_NAME: batch[dataset.FEATURE_IMAGE]})
            probs[k].append(outputs[model_files.OUTPUT_PROBABILITIES].numpy())
    y_true = np.concatenate(truth)
    return len(y_true), [evaluate(y_true, np.concatenate(p), labels, thresholds, beta)
                         for p, (_, thresholds) in zip(probs, servables, strict=True)]


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


def _compare(job: RetrainJob, workspace: Workspace, run_id: str, run_info: Any,
             champion: Champion | None) -> dict:
    """Scores challenger and champion on this run's test split and applies the gate."""
    gate = job.retrain
    exports = [run_info.export_path] + ([champion.export_path] if champion else [])
    examples, metrics = score_exports(workspace.dataset_dir(run_id), exports, job.train.beta)
    night_report.save_comparison(workspace, run_id, examples, metrics)
    challenger_metrics = metrics[0]
    challenger = gate_value(challenger_metrics, gate.metric)
    champion_value, champion_metrics = None, None
    if champion:
        champion_metrics = metrics[1]
        champion_value = gate_value(champion_metrics, gate.metric)
    promote, reason = decide(challenger, champion_value, gate.tolerance, gate.min_metric)
    return {
        "run_id": run_id,
        "metric": gate.metric,
        "test_examples": examples,
        "challenger": {"export_path": relative(workspace.root, run_info.export_path), "value": challenger,
                       "macro_f1": challenger_metrics["at_tuned"]["macro_f1"],
                       "macro_average_precision": challenger_metrics["macro_average_precision"]},
        "champion": None if not champion else {
            "run_id": champion.run_id, "export_path": relative(workspace.root, champion.export_path),
            "value": champion_value,
            "macro_f1": champion_metrics["at_tuned"]["macro_f1"],
            "macro_average_precision": champion_metrics["macro_average_precision"]},
        "promoted": promote,
        "reason": reason,
    }


def promote_step(job: RetrainJob, workspace: Workspace, run_id: str, lease: leases.Lease) -> dict:
    """Compares the challenger with the champion read now, under the lease, and replaces
    champion.json only if it still is what was compared with (a compare-and-swap); a challenger
    that lost a race is compared again with the new champion."""
    run_info = model_files.read_run_info(workspace.model_dir(run_id))
    if run_info is None:
        raise StepError(f"{workspace.model_dir(run_id)} has no finished training run (run.json with export_path): "
                        "run the train step")
    for attempt in range(1, PROMOTE_ATTEMPTS + 1):
        champion, version = workspace.champion_versioned()
        if champion and not storage.exists(storage.join(champion.export_path, model_files.SAVED_MODEL_PB)):
            raise StepError(f"{workspace.champion_file} names the model {champion.export_path}, which is gone: "
                            f"{workspace.restore_hint}")
        decision = {**_compare(job, workspace, run_id, run_info, champion), "comparisons": attempt}
        if decision["promoted"]:
            lease.check()
            new = Champion(run_id=run_id, export_path=run_info.export_path,
                           labels_file=storage.join(workspace.model_dir(run_id), model_files.LABELS_TXT),
                           metric=job.retrain.metric, value=decision["challenger"]["value"],
                           promoted_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
            if not workspace.replace_champion(new, version):
                log.warning("[promote] champion.json changed while the models were compared (another run "
                            "promoted): comparing again with the new champion")
                continue
        storage.write_json(workspace.decision(run_id), decision)
        log.info("[promote] %s: %s", "PROMOTED" if decision["promoted"] else "refused", decision["reason"])
        return decision
    raise StepError(f"champion.json changed during each of {PROMOTE_ATTEMPTS} comparisons; nothing was promoted")


def prune_runs(workspace: Workspace, keep: int, champion_run: str | None) -> list[str]:
    """Deletes all but the newest `keep` runs; the champion's run is never deleted."""
    names = workspace.runs()
    doomed = [n for n in names[: max(0, len(names) - keep)] if n != champion_run]
    for name in doomed:
        storage.remove_tree(workspace.run_dir(name))
    return doomed


def _dataset_counts(workspace: Workspace, run_id: str) -> dict | None:
    meta = storage.read_state_json(storage.join(workspace.dataset_dir(run_id), DATASET_JSON),
                                   "rerun the preprocess step")
    if not meta:
        return None
    return {"input_rows": meta["input_rows"], "rejected": meta["rejected"],
            "examples": {name: split["examples"] for name, split in meta["splits"].items()},
            **{key: meta.get(key, 0) for key in ("rows_fetched", "rows_reused", "rows_revalidated")}}


def _run_id(job: RetrainJob, workspace: Workspace) -> str:
    if job.retrain.run_id:
        return job.retrain.run_id
    if job.retrain.step in ("check", "train", "promote"):
        existing = workspace.runs()
        if not existing:
            raise StepError(f"no runs under {workspace.root}/runs: run --step preprocess first or pass --run_id")
        return existing[-1]
    return _new_run_id()


def _hold(job: RetrainJob, workspace: Workspace, run_id: str) -> leases.Lease:
    """The workspace's lease for this run (this step of it, under --step), per --if_held."""
    def waiting(holder: leases.Holder, left: float) -> None:
        log.info("[lease] the workspace is held by %s; waiting, %.0f s left of --held_wait_s", holder.describe(), left)

    wait_s = job.retrain.held_wait_s if job.retrain.if_held == "wait" else 0.0
    return leases.acquire(workspace.lease_file, run_id, wait_s, waiting)


def _held(job: RetrainJob, workspace: Workspace, record: dict[str, Any], held: leases.Held) -> int:
    """Records and reports a run that did not get the workspace."""
    policy = job.retrain.if_held
    record.update(held_by=held.holder.run_id, holder=held.holder.to_json(), waited_s=round(held.waited_s, 1))
    if policy == "skip":
        record.update(outcome="skipped", reason=f"{held}; nothing was done (--if_held skip)")
        workspace.append_history(record)
        print(f"[retrain] run {record['run_id']}: skipped: {record['reason']}; history {workspace.history_file}")
        return 0
    waited = f" after waiting {held.waited_s:.0f} s (--held_wait_s)" if policy == "wait" else " (--if_held fail)"
    record.update(outcome="failed", reason=f"{held}{waited}")
    workspace.append_history(record)
    print(f"error: {record['reason']}; nothing was done, the champion is unchanged", file=sys.stderr)
    return 1


def restore_champion(workspace: Workspace, run_id: str, lease: leases.Lease) -> int:
    """--restore_champion: champion.json rebuilt from history.jsonl, under the lease."""
    champion = workspace.champion_from_history()
    if champion is None:
        print(f"error: {workspace.history_file} records no promotion whose model is still in the workspace: nothing "
              f"to restore; delete {workspace.champion_file} to let the next run promote without a champion",
              file=sys.stderr)
        return 1
    _, version = storage.read_versioned(workspace.champion_file)  # whatever is there now, unreadable or not
    lease.check()
    if not workspace.replace_champion(champion, version):
        raise StepError(f"{workspace.champion_file} changed while it was rebuilt; run {RESTORE_CHAMPION} again")
    workspace.append_history({"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "run_id": run_id, "step": "restore_champion", "outcome": "champion restored",
                              "champion": champion.run_id})
    print(f"[retrain] {workspace.champion_file} rebuilt from {workspace.history_file}: run {champion.run_id} "
          f"({champion.metric} {champion.value:.4f}, promoted {champion.promoted_at}), model {champion.export_path}")
    return 0


def check_paths(job: RetrainJob) -> None:
    """The preprocess step's paths against the Beam options it is given, before any step runs (it
    checks them again itself): its dataset folder is under --workspace."""
    runners.check_paths(cli.pipeline_options(job.beam_args),
                        {**runners.manifest_paths(job.manifest), "--workspace": job.retrain.workspace})


def run(job: RetrainJob) -> int:
    workspace = Workspace(job.retrain.workspace)
    storage.makedirs(storage.join(workspace.root, "runs"))
    if job.retrain.restore_champion:
        run_id = _new_run_id()
        try:
            lease = _hold(job, workspace, run_id)
        except leases.Held as held:
            raise StepError(f"{held}: run {RESTORE_CHAMPION} when it is done") from None
        with lease:
            return restore_champion(workspace, run_id, lease)
    run_id = _run_id(job, workspace)
    if job.retrain.step in ("check", "train", "promote"):
        job = _with_recorded_options(job, workspace, run_id)
    started = dt.datetime.now(dt.UTC)
    record: dict[str, Any] = {"time": started.isoformat(timespec="seconds"), "run_id": run_id,
                              "step": job.retrain.step, "input": job.manifest.input}
    try:
        lease = _hold(job, workspace, run_id)
    except leases.Held as held:
        return _held(job, workspace, record, held)
    with lease:
        if lease.took_over:
            record["took_over_from"] = lease.took_over.run_id
        if lease.waited_s >= 1:
            record["waited_s"] = round(lease.waited_s, 1)
        return _run_holding(job, workspace, run_id, lease, record, started)


def _run_holding(job: RetrainJob, workspace: Workspace, run_id: str, lease: leases.Lease, record: dict[str, Any],
                 started: dt.datetime) -> int:
    steps = STEPS[1:] if job.retrain.step == "all" else (job.retrain.step,)
    try:
        champion = workspace.champion()
        record["champion_before"] = champion and champion.run_id
        for step in steps:
            if step == "preprocess":
                preprocess_step(job, workspace, run_id, champion)
                record["data"] = _dataset_counts(workspace, run_id)
            elif step == "check":
                record["health"] = check_step(job, workspace, run_id, champion)
            elif step == "train":
                _subprocess("train", train_argv(job, workspace, run_id))
            else:
                record["decision"] = promote_step(job, workspace, run_id, lease)
    except Exception as e:  # noqa: BLE001 - every failure must be recorded before exiting non-zero
        if not isinstance(e, (StepError, StateError, leases.LeaseLost)):
            log.exception("unexpected failure")
        record.update(outcome="failed", reason=f"{type(e).__name__}: {e}")
        report = storage.read_json_if_exists(workspace.health(run_id)) if "check" in steps else None
        if report and "health" not in record:
            record["health"] = report
        workspace.append_history(record)
        night_report.write_logged(workspace, run_id, record)
        print(f"error: {e}; the champion is unchanged", file=sys.stderr)
        return 1
    record["outcome"] = PROMOTED if record.get("decision", {}).get("promoted") else (
        "refused" if "decision" in record else "step done")
    if "promote" in steps:
        current = workspace.champion()
        record["pruned"] = prune_runs(workspace, job.retrain.keep_versions, current and current.run_id)
    record["seconds"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    workspace.append_history(record)
    night_report.write_logged(workspace, run_id, record)
    current = workspace.champion()
    reason = f" ({record['decision']['reason']})" if "decision" in record else ""
    print(f"[retrain] run {run_id}: {record['outcome']}{reason} in {record['seconds']:.0f} s; champion "
          f"{current.run_id + ' ' + current.export_path if current else 'none yet'}; run folder "
          f"{workspace.run_dir(run_id)}; history {workspace.history_file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        job = parse_args(argv)
    except SystemExit as done:  # --help, or a flag error already printed as one line
        return int(done.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    unusable = flags.run_main(lambda: check_paths(job))
    if unusable:
        return unusable
    try:
        return run(job)
    except (StepError, StateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    console.quiet_native_logs()
    sys.exit(main())
