"""Trains, evaluates and exports a multi-label image tagger: `python -m trainer.task --help`.

Reads a dataset directory written by `python -m pipelines.preprocess` (docs/dataset.md), trains a
head on a TF Hub image feature vector under MirroredStrategy, tunes one decision threshold per
label on the validation split, evaluates on the test split and exports a servable SavedModel.
Runs unchanged locally and as a Vertex AI custom job (AIP_* environment variables).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from tagbeam import console, flags, storage
from tagbeam import export as model_files
from tagbeam.dataset import DATASET_JSON
from trainer.config import TaskOptions, TrainerJob, TrainOptions

if TYPE_CHECKING:  # imported lazily below: --help and flag errors must not wait for TensorFlow
    import tensorflow as tf

    from tagbeam.dataset import DatasetInfo
    from trainer.model import Backbone
    from trainer.train import TrainResult

log = logging.getLogger("trainer.task")  # not __name__: that is "__main__" under python -m

SAMPLE_GRID_IMAGES = 16
UsageError = flags.UsageError


def build_parser() -> argparse.ArgumentParser:
    p = flags.Parser(prog="python -m trainer.task", description=__doc__.split("\n\n")[1])
    flags.add_job_options(p, TrainerJob)
    return p


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, TaskOptions, TrainOptions]:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    try:
        job = TrainerJob(**flags.build_parts(TrainerJob, namespace))
    except UsageError as err:
        parser.error(str(err))
    return namespace, job.task, job.train


def parse_args(argv: list[str] | None = None) -> tuple[TaskOptions, TrainOptions]:
    """The run's options; a flag error exits 2 with one `error:` line."""
    return _parse(argv)[1:]


@dataclasses.dataclass
class RunOutcome:
    """What a run produced, for callers that go on using the model (tests, notebooks)."""

    result: TrainResult
    thresholds: np.ndarray
    metrics: dict | None  # metrics.json content, None without a test split
    export_path: str
    run_info: dict
    evaluation: Evaluation


@dataclasses.dataclass
class Evaluation:
    """Thresholds tuned on val (train when val is empty) and the test metrics at them."""

    thresholds: np.ndarray
    tuned_on: str
    val_f1: float
    metrics: dict | None  # None without a test split
    test_f1: float | None


def load_inputs(task: TaskOptions, options: TrainOptions) -> tuple[DatasetInfo, tf.distribute.Strategy, Backbone]:
    """Stage 1: the dataset's description, the distribution strategy and the backbone."""
    import tensorflow as tf
    import tf_keras

    from tagbeam import dataset
    from trainer import embedded_backbone
    from trainer import model as model_lib

    info = dataset.read(task.data_dir)
    if info.split("train").examples == 0 or not info.split("train").files:
        raise dataset.DatasetError(f"the train split of {task.data_dir} is empty: check the pipeline's "
                                   "rejected-*.jsonl and its split fractions, then rerun `python -m pipelines.preprocess`")
    strategy = model_lib.setup_strategy(options.cpu_replicas)
    export_base = storage.join(task.model_dir, model_files.EXPORT_DIR)
    if task.version is not None and tf.io.gfile.exists(storage.join(export_base, str(task.version))):
        raise UsageError(f"--version {task.version}: {export_base}/{task.version} already exists; "
                         "pick another version (served versions are never overwritten)")
    if options.seed is not None:
        tf_keras.utils.set_random_seed(options.seed)
    try:
        handle = embedded_backbone.resolve(options.backbone)
    except FileNotFoundError as err:  # an embedded backbone whose weights package is missing
        raise model_lib.BackboneError(f"--backbone {options.backbone}: {err}") from None
    gpus = model_lib.gpu_count()
    if options.device_jit_compile(gpus) and not gpus and strategy.num_replicas_in_sync > 1:
        # Every logical CPU is the same XLA device, and the replicas' variables sit on different ones.
        raise UsageError("--jit_compile on: XLA cannot run MirroredStrategy over logical CPU devices (a replica's "
                         "compiled step would reach into another device's variables); use it with GPUs or one replica")
    precision = options.device_precision(gpus)
    model_lib.set_precision(precision)
    log.info("precision %s, XLA %s, extraction batch %d per replica (%d GPU(s))", precision,
             "on" if options.device_jit_compile(gpus) else "off", options.device_extraction_batch(gpus), gpus)
    with strategy.scope():
        backbone = model_lib.load_backbone(handle, trainable=options.fine_tune_layers > 0)
    model_lib.check_image_size(backbone, info.image_size)
    suited = embedded_backbone.BACKBONES.get(options.backbone)
    if suited and suited.image_size != info.image_size:
        log.info("--backbone %s suits images stored at %d px (benchmarks/README.md); this dataset stores %d px: "
                 "the backbone runs on them as they are (preprocess with --image_size %d to follow the measurement)",
                 suited.name, suited.image_size, info.image_size, suited.image_size)
    return info, strategy, backbone


def evaluate_run(info: DatasetInfo, result: TrainResult, options: TrainOptions, model_dir: str,
                 backbone: Backbone | None = None) -> Evaluation:
    """Stage 3: per-label thresholds on val, test metrics and the report (plots) at them, and what
    report.html needs (trainer/report.py; class activation maps when `backbone` allows them)."""
    from trainer import data
    from trainer.evaluation import evaluate, write_report
    from trainer.thresholds import tune_thresholds

    labels = list(info.labels)
    tuned_on = "val"
    val = result.predict("val")
    if val is None:
        log.warning("!!! the val split is empty: thresholds are tuned on the TRAIN split and will be optimistic !!!")
        tuned_on, val = "train", result.predict("train")
    val_probs, val_true = val
    thresholds = tune_thresholds(val_true, val_probs, options.beta)
    val_f1 = evaluate(val_true, val_probs, labels, thresholds, options.beta)["at_tuned"]["macro_f1"]

    test = result.predict("test")
    if test is None:
        log.warning("the test split is empty: skipping test evaluation (no metrics.json or plots)")
        return Evaluation(thresholds, tuned_on, val_f1, None, None)
    test_probs, test_true = test
    metrics = evaluate(test_true, test_probs, labels, thresholds, options.beta)
    images, _ = data.sample_images(info, "test", SAMPLE_GRID_IMAGES)
    samples = [
        (image, [name for name, t in zip(labels, truth, strict=True) if t > 0],
         [name for name, p, th in zip(labels, probs, thresholds, strict=True) if p >= th])
        # The grid shows the first test examples: their rows of the test scores.
        for image, truth, probs in zip(images, test_true[:len(images)], test_probs[:len(images)], strict=True)
    ]
    write_report(model_dir, metrics, result.history, samples)
    _save_report_data(info, result, options, model_dir, backbone, test_probs, test_true, thresholds)
    return Evaluation(thresholds, tuned_on, val_f1, metrics, metrics["at_tuned"]["macro_f1"])


def _save_report_data(info: DatasetInfo, result: TrainResult, options: TrainOptions, model_dir: str,
                      backbone: Backbone | None, probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> None:
    """The test scores, thumbnails and maps report.html is built from; a failure costs the page, not the run."""
    from trainer import report

    try:
        cam_note = (report.cam_unavailable(backbone, options.hidden_units) if backbone
                    else "No class activation maps: the run handed no backbone to the evaluation.")
        head = result.model.get_layer("head")
        cam_maker = None if cam_note else (lambda images: report.class_activation_maps(backbone, head, images))
        report.save_evaluation(model_dir, info, probs, truth, thresholds, cam_note, cam_maker)
    except Exception:  # noqa: BLE001 - the report must never cost the user the model
        log.exception("could not keep the test scores and gallery images for %s; the model is fine",
                      model_files.REPORT_HTML)


def write_outputs(task: TaskOptions, info: DatasetInfo, result: TrainResult, evaluation: Evaluation,
                  backbone_record: dict[str, Any]) -> str:
    """Stage 4: the serving SavedModel, then history.json, thresholds.json and labels.txt. Returns the export."""
    import json

    from tagbeam.dataset import labels_text
    from trainer.serving import export_model

    labels = list(info.labels)
    # Serving re-encodes the resized image like the stored JPEGs, so the model sees the same
    # compression artefacts it was trained on (cuts the probability skew ~5x; tests/test_skew.py).
    export_path = export_model(result.model, storage.join(task.model_dir, model_files.EXPORT_DIR), labels,
                               evaluation.thresholds, info.stored_images, task.version, backbone_record)
    storage.write_text(storage.join(task.model_dir, model_files.HISTORY_JSON), json.dumps(result.history, indent=2) + "\n")
    storage.write_text(storage.join(task.model_dir, model_files.THRESHOLDS_JSON),
                       model_files.thresholds_json(labels, evaluation.thresholds))
    storage.write_text(storage.join(task.model_dir, model_files.LABELS_TXT), labels_text(labels))
    return export_path


def run(task: TaskOptions, options: TrainOptions, flag_record: dict[str, Any] | None = None) -> RunOutcome:
    """Everything `main` does; raises DatasetError / BackboneError / UsageError for problems the user
    must fix. `flag_record`: the flags as given (run.json's "flags"); default: the options' values."""
    start = time.perf_counter()
    # Imports run no TensorFlow op, so the CPU can still be split in load_inputs.
    from trainer.config import CACHED
    from trainer.model import cluster_from_env
    from trainer.train import OutputDirs

    info, strategy, backbone = load_inputs(task, options)
    dirs = OutputDirs.under(task.model_dir, os.environ.get("AIP_CHECKPOINT_DIR"),
                            os.environ.get("AIP_TENSORBOARD_LOG_DIR"))
    cluster = cluster_from_env()
    if cluster is not None and not cluster.is_chief:
        # Every worker runs every step (the collective ones must match), but only the chief's
        # outputs are kept: the others write theirs to scratch space, removed at the end. They
        # share two folders with the chief. The feature cache: after a restart every worker must
        # find the same splits cached, or one would extract (collectively) while another skips.
        # And, through the backbone, the backup: MultiWorkerMirroredStrategy's BackupAndRestore
        # restores every worker from the chief's; on cached features the head trains on each
        # worker alone (not distributed), so each keeps its own backup.
        scratch = tempfile.mkdtemp(prefix=f"tagbeam-{cluster.task_type}{cluster.task_index}-")
        local = OutputDirs.under(scratch)
        dirs = dataclasses.replace(local, feature_cache=dirs.feature_cache,
                                   backup=local.backup if options.path == CACHED else dirs.backup)
        try:
            outcome = _run_in(dataclasses.replace(task, model_dir=scratch), options, info, strategy, backbone,
                              dirs, flag_record, start)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"[trainer] {cluster.task_type} {cluster.task_index} of {cluster.workers} workers done; the chief "
              f"writes the outputs to {task.model_dir}")
        return outcome
    outcome = _run_in(task, options, info, strategy, backbone, dirs, flag_record, start)
    print(summary(task.model_dir, outcome.export_path, outcome.run_info, outcome.evaluation))
    return outcome


def _run_in(task: TaskOptions, options: TrainOptions, info: DatasetInfo, strategy: tf.distribute.Strategy,
            backbone: Backbone, dirs: Any, flag_record: dict[str, Any] | None, start: float) -> RunOutcome:
    """Stages 2-4 with outputs under task.model_dir."""
    import tensorflow as tf

    from trainer.train import train

    tf.io.gfile.makedirs(task.model_dir)
    try:
        result = train(strategy, info, backbone, options, dirs)  # stage 2
        evaluation = evaluate_run(info, result, options, task.model_dir, backbone)
    except tf.errors.DataLossError as err:
        from trainer.data import corrupt_dataset_error

        raise corrupt_dataset_error(info, err) from None
    backbone_record = {"name": options.backbone, "handle": backbone.handle, "path": backbone.path,
                       "info": backbone.info}
    export_path = write_outputs(task, info, result, evaluation, backbone_record)
    epochs_done = len(result.history.get("loss", []))
    run_info = model_files.RunInfo(
        flags=flag_record or {**dataclasses.asdict(task), **dataclasses.asdict(options)},
        dataset_json=storage.join(info.data_dir, DATASET_JSON),
        backbone=backbone_record,
        training_path=result.path,
        num_replicas_in_sync=strategy.num_replicas_in_sync,
        devices=list(strategy.extended.worker_devices),
        initial_epoch=result.initial_epoch,
        epochs_completed=epochs_done,
        thresholds_tuned_on=evaluation.tuned_on,
        val_macro_f1_tuned=evaluation.val_f1,
        test_macro_f1_tuned=evaluation.test_f1,
        export_path=export_path,
        timings={**result.timings, "total_s": time.perf_counter() - start},
        tensorflow=tf.__version__,
    ).to_json()
    storage.write_json(storage.join(task.model_dir, model_files.RUN_JSON), run_info)  # the run is done
    from trainer import report

    report.save_context(task.model_dir, dataset={
        "path": info.data_dir, "image_size": info.image_size,
        "splits": {name: info.split(name).examples for name in ("train", "val", "test")}})
    report.write_logged(task.model_dir)
    return RunOutcome(result, evaluation.thresholds, evaluation.metrics, export_path, run_info, evaluation)


def summary(model_dir: str, export_path: str, run_info: dict[str, Any], evaluation: Evaluation) -> str:
    """What the run did and wrote where, for the end of the command's output."""
    test = "no test split" if evaluation.test_f1 is None else f"test {evaluation.test_f1:.3f}"
    lines = [f"[trainer] {run_info['epochs_completed']} epoch(s) on the {run_info['training_path']} path, "
             f"{run_info['num_replicas_in_sync']} replica(s), {run_info['timings']['total_s']:.0f} s; macro-F1 at tuned "
             f"thresholds: {evaluation.tuned_on} {evaluation.val_f1:.3f}, {test}",
             f"  SavedModel (serving_default: {model_files.INPUT_NAME} -> probabilities, predicted_labels): {export_path}"]
    written = [(model_files.METRICS_JSON, "test metrics"), (model_files.THRESHOLDS_JSON, "per-label thresholds"),
               (model_files.RUN_JSON, "flags, timings"), (model_files.HISTORY_CSV, "every epoch"),
               (model_files.REPORT_HTML, "the report to judge the model by (open in a browser)")]
    lines += [f"  {what}: {storage.join(model_dir, name)}" for name, what in written
              if storage.exists(storage.join(model_dir, name))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        namespace, task, options = _parse(argv)
    except SystemExit as done:  # --help, or a flag error already printed as one line
        return int(done.code or 0)
    # TensorFlow's own INFO lines (one per all-reduce) would drown the trainer's progress lines.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO)
    # Keras times every callback per batch and warns when ours (backups, TensorBoard) outlast a
    # millisecond batch of the linear head: true, and nothing to act on.
    logging.getLogger("tensorflow").addFilter(lambda record: "is slow compared to the batch time" not in record.getMessage())
    from tagbeam.dataset import DatasetError
    from trainer.model import BackboneError

    return flags.run_main(lambda: run(task, options, vars(namespace)), (DatasetError, BackboneError))


if __name__ == "__main__":
    console.quiet_native_logs()
    sys.exit(main())
