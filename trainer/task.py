"""Trains, evaluates and exports a multi-label image tagger: `python -m trainer.task --help`.

Reads a dataset directory written by `python -m pipelines.preprocess` (docs/dataset.md), trains a
head on a TF Hub image feature vector under MirroredStrategy, tunes one decision threshold per
label on the validation split, evaluates on the test split and exports a servable SavedModel.
Runs unchanged locally and as a Vertex AI custom job (AIP_* environment variables).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported lazily below: --help and flag errors must not wait for TensorFlow
    from trainer.train import TrainResult

log = logging.getLogger("trainer.task")  # not __name__: that is "__main__" under python -m

SAMPLE_GRID_IMAGES = 16


class UsageError(ValueError):
    """A flag value that conflicts with what is on disk; the message names the flag."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.task",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--data_dir", required=True,
                   help="dataset directory from `python -m pipelines.preprocess` (local or gs://)")
    p.add_argument("--model_dir", default=os.environ.get("AIP_MODEL_DIR"),
                   help="output folder (local or gs://): export/<version>/, metrics.json, plots, history.json, "
                        "thresholds.json, labels.txt, run.json, checkpoints/, backup/, logs/, feature_cache/; "
                        "defaults to $AIP_MODEL_DIR (set by Vertex AI). $AIP_CHECKPOINT_DIR and "
                        "$AIP_TENSORBOARD_LOG_DIR, when set, move checkpoints/ and logs/")
    p.add_argument("--hub_handle", default=None,
                   help="image feature-vector backbone: a tfhub.dev or Kaggle URL, or a gs:// or local TF2 SavedModel "
                        "path taking float RGB [0,1] images; default: the embedded MobileNetV2 "
                        "(trainer.embedded_backbone, works offline)")
    p.add_argument("--epochs", type=int, default=None,
                   help="maximum training epochs; early stopping usually ends training sooner (default: 300 on cached "
                        "features, where an epoch takes under a second; 30 when training through the backbone)")
    p.add_argument("--batch_size", type=int, default=256, help="GLOBAL batch size, split across the replicas (default: %(default)s)")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="Adam learning rate of the head (default: %(default)s)")
    p.add_argument("--hidden_units", type=int, default=0,
                   help="units of a Dense(relu) hidden layer in the head; 0 = linear head (default; the TF tutorial uses 1024)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout rate before the output layer (default: %(default)s)")
    p.add_argument("--loss", choices=["bce", "soft_f1"], default="bce",
                   help="bce (default): sigmoid cross-entropy from logits; soft_f1: 1 - macro soft-F1 over the batch")
    p.add_argument("--positive_weights", "--class_weights", action="store_true",
                   help="weight each label's positive term by its negative/positive ratio in the train split "
                        "(dataset.json label counts), for imbalanced labels; bce only")
    p.add_argument("--beta", type=float, default=1.0,
                   help="per-label thresholds maximise F-beta on val (1 = F1; 2 favours recall, the Planet metric); "
                        "metrics.json reports F-beta with the same beta (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for weights, shuffling and augmentation; makes runs repeatable (default: random)")
    p.add_argument("--fine_tune_layers", type=int, default=0,
                   help="unfreeze the top N trainable backbone variables (forward order) and train them with "
                        "--fine_tune_learning_rate; 0 (default) keeps the backbone frozen")
    # 1e-4, not the usual 1e-5: only the top variables train, batch-norm statistics stay frozen, and
    # the head is warm-started. On the benchmark's posters 1e-5 reached val loss 0.218 in 4 epochs,
    # 1e-4 0.180 in 6 (held-out macro-F1 0.864; benchmarks/README.md).
    p.add_argument("--fine_tune_learning_rate", type=float, default=1e-4,
                   help="Adam learning rate of the unfrozen backbone variables (default: %(default)s)")
    p.add_argument("--warm_start_epochs", type=int, default=300,
                   help="with --fine_tune_layers: first train the head on cached frozen features for at most this many "
                        "epochs (early stopping ends it), then fine-tune; 0 fine-tunes from a random head (default: %(default)s)")
    p.add_argument("--augment", choices=["none", "flip", "dihedral"], default="none",
                   help="training augmentation: flip = random horizontal flips; dihedral = flips and quarter turns "
                        "(overhead imagery such as Planet chips); default: none")
    p.add_argument("--cpu_replicas", type=int, default=1,
                   help="with no GPU visible, split the CPU into N logical devices so MirroredStrategy runs N "
                        "replicas (the code path of N GPUs); ignored when GPUs are present (default: %(default)s)")
    p.add_argument("--early_stopping_patience", type=int, default=None,
                   help="epochs without improvement of the monitored loss (val, or train without val) before stopping; "
                        "the learning rate halves after half as many (default: 20 on cached features, 5 through the backbone)")
    p.add_argument("--feature_cache", choices=["auto", "off"], default="auto",
                   help="auto (default): with a frozen backbone and no augmentation, compute backbone features once per split, "
                        "cache them under model_dir/feature_cache/ and train the head on them; off: always run "
                        "every image through the backbone")
    p.add_argument("--version", type=int, default=None,
                   help="export version folder under model_dir/export/ (default: an increasing timestamp)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model_dir:
        parser.error("--model_dir is required when $AIP_MODEL_DIR is not set")
    positive = {"--epochs": args.epochs, "--batch_size": args.batch_size, "--learning_rate": args.learning_rate,
                "--fine_tune_learning_rate": args.fine_tune_learning_rate, "--beta": args.beta,
                "--cpu_replicas": args.cpu_replicas, "--early_stopping_patience": args.early_stopping_patience}
    for flag, value in positive.items():
        if value is not None and value <= 0:
            parser.error(f"{flag} must be > 0, got {value}")
    for flag, value in {"--hidden_units": args.hidden_units, "--fine_tune_layers": args.fine_tune_layers,
                        "--warm_start_epochs": args.warm_start_epochs}.items():
        if value < 0:
            parser.error(f"{flag} must be >= 0, got {value}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.positive_weights and args.loss != "bce":
        parser.error("--positive_weights applies to --loss bce only (soft_f1 already weighs labels equally)")
    return args


@dataclasses.dataclass
class RunOutcome:
    """What a run produced, for callers that go on using the model (tests, notebooks)."""

    result: TrainResult
    thresholds: np.ndarray
    metrics: dict | None  # metrics.json content, None without a test split
    export_path: str
    run_info: dict


def _write_text(path: str, text: str) -> None:
    import tensorflow as tf  # lazily, like every TensorFlow import here: --help stays instant

    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)


def run(args: argparse.Namespace) -> RunOutcome:
    """Everything `main` does; raises DatasetError / BackboneError for problems the user must fix."""
    start = time.perf_counter()
    # Imports run no TensorFlow op, so the CPU can still be split below.
    import tensorflow as tf
    import tf_keras

    from trainer import data, embedded_backbone, model as model_lib
    from trainer.evaluation import evaluate, write_report
    from trainer.losses import positive_weights
    from trainer.serving import export_model
    from trainer.thresholds import thresholds_to_json, tune_thresholds
    from trainer.train import OutputDirs, TrainConfig, train

    info = data.read_dataset_info(args.data_dir)
    train_split = info.split("train")
    if train_split.examples == 0 or not train_split.files:
        raise data.DatasetError(f"the train split of {args.data_dir} is empty: check the pipeline's rejected-*.jsonl "
                                "and its split fractions, then rerun `python -m pipelines.preprocess`")
    strategy = model_lib.setup_strategy(args.cpu_replicas)

    export_base = data.join_path(args.model_dir, "export")
    if args.version is not None and tf.io.gfile.exists(data.join_path(export_base, str(args.version))):
        raise UsageError(f"--version {args.version}: {export_base}/{args.version} already exists; "
                         "pick another version (served versions are never overwritten)")
    if args.seed is not None:
        tf_keras.utils.set_random_seed(args.seed)
    handle = args.hub_handle or embedded_backbone.default_handle()
    with strategy.scope():
        backbone = model_lib.load_backbone(handle, trainable=args.fine_tune_layers > 0)
    model_lib.check_image_size(backbone, info.image_size)

    dirs = OutputDirs.under(args.model_dir, os.environ.get("AIP_CHECKPOINT_DIR"), os.environ.get("AIP_TENSORBOARD_LOG_DIR"))
    tf.io.gfile.makedirs(args.model_dir)
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        hidden_units=args.hidden_units, dropout=args.dropout, loss=args.loss,
        pos_weight=positive_weights(train_split.label_counts, train_split.examples) if args.positive_weights else None,
        seed=args.seed, fine_tune_layers=args.fine_tune_layers, fine_tune_learning_rate=args.fine_tune_learning_rate,
        augment=args.augment, early_stopping_patience=args.early_stopping_patience, feature_cache=args.feature_cache,
        warm_start_epochs=args.warm_start_epochs,
    )
    result = train(strategy, info, backbone, config, dirs)

    labels = list(info.labels)
    tuned_on = "val"
    val = result.predict("val")
    if val is None:
        log.warning("!!! the val split is empty: thresholds are tuned on the TRAIN split and will be optimistic !!!")
        tuned_on, val = "train", result.predict("train")
    val_probs, val_true = val
    thresholds = tune_thresholds(val_true, val_probs, args.beta)
    val_f1 = evaluate(val_true, val_probs, labels, thresholds, args.beta)["at_tuned"]["macro_f1"]

    metrics, test_f1 = None, None
    test = result.predict("test")
    if test is None:
        log.warning("the test split is empty: skipping test evaluation (no metrics.json or plots)")
    else:
        test_probs, test_true = test
        metrics = evaluate(test_true, test_probs, labels, thresholds, args.beta)
        test_f1 = metrics["at_tuned"]["macro_f1"]
        images, _ = data.sample_images(info, "test", SAMPLE_GRID_IMAGES)
        samples = [
            (image, [name for name, t in zip(labels, truth) if t > 0],
             [name for name, p, th in zip(labels, probs, thresholds) if p >= th])
            for image, truth, probs in zip(images, test_true, test_probs)
        ]
        write_report(args.model_dir, metrics, result.history, samples)

    # Serving re-encodes the resized image like the stored JPEGs, so the model sees the same
    # compression artefacts it was trained on (cuts the probability skew ~5x; tests/test_skew.py).
    jpeg_quality, jpeg_subsampling = info.stored_jpeg or (None, "4:2:0")
    export_path = export_model(result.model, export_base, labels, thresholds, info.image_size, info.resize_policy,
                               args.version, jpeg_quality=jpeg_quality, jpeg_subsampling=jpeg_subsampling)
    _write_text(data.join_path(args.model_dir, "history.json"), json.dumps(result.history, indent=2) + "\n")
    _write_text(data.join_path(args.model_dir, "thresholds.json"), thresholds_to_json(labels, thresholds))
    _write_text(data.join_path(args.model_dir, "labels.txt"), "".join(f"{label}\n" for label in labels))
    epochs_done = len(result.history.get("loss", []))
    run_info = {
        "flags": vars(args),
        "dataset_json": info.dataset_json,
        "backbone": {"handle": handle, "path": backbone.path, "info": backbone.info},
        "training_path": result.path,
        "num_replicas_in_sync": strategy.num_replicas_in_sync,
        "devices": list(strategy.extended.worker_devices),
        "initial_epoch": result.initial_epoch,
        "epochs_completed": epochs_done,
        "thresholds_tuned_on": tuned_on,
        "val_macro_f1_tuned": val_f1,
        "test_macro_f1_tuned": test_f1,
        "export_path": export_path,
        "timings": {**result.timings, "total_s": time.perf_counter() - start},
        "tensorflow": tf.__version__,
    }
    _write_text(data.join_path(args.model_dir, "run.json"), json.dumps(run_info, indent=2, default=str) + "\n")
    log.info(
        "done: %d epoch(s) on the %s path with %d replica(s) in %.0f s; macro-F1 at tuned thresholds: "
        "%s %.3f, test %s; exported to %s",
        epochs_done, result.path, strategy.num_replicas_in_sync, run_info["timings"]["total_s"], tuned_on, val_f1,
        "skipped" if test_f1 is None else f"{test_f1:.3f}", export_path,
    )
    return RunOutcome(result, thresholds, metrics, export_path, run_info)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # TensorFlow's own INFO lines (one per all-reduce) would drown the trainer's progress lines.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO)
    from trainer.data import DatasetError
    from trainer.model import BackboneError

    try:
        run(args)
    except (DatasetError, BackboneError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
