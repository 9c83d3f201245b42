"""The fit loop: the cached-feature fast path and the through-the-backbone path.

With a frozen backbone and no augmentation, the backbone computes the same features for an image
in every epoch, so they are computed once per split (batched, on every replica), cached under the
model directory, and only the head is trained on them; the full model (backbone + that head) is
assembled afterwards for export. Fine-tuning or augmentation needs fresh features every step and
trains through the backbone. Both paths share the head, the data order, the callbacks and the
checkpoint/backup layout, so a killed job resumes on either.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from typing import Callable

import numpy as np
import tensorflow as tf
import tf_keras

from trainer import data, model as model_lib
from trainer.losses import get_loss
from trainer.metrics import training_metrics

log = logging.getLogger(__name__)

CACHED = "cached_features"
THROUGH_BACKBONE = "backbone"


EXTRACTION_BATCH_SIZE = 32  # per replica; bounds the backbone's activation memory during feature extraction
# Maximum epochs when --epochs is not given. Early stopping ends training on either path; on
# cached features an epoch costs well under a second and a linear head on a few thousand examples
# (15 steps per epoch at batch 256) is still improving at 30 epochs (benchmarks/README.md, quality),
# while through the backbone every epoch is a full pass through the network.
DEFAULT_EPOCHS = {CACHED: 300, THROUGH_BACKBONE: 30}
# Early-stopping patience when not given (the LR is halved after half of it). On cached features
# val loss is noisy from epoch to epoch (15 steps each) and 5 stopped the head early: held-out
# macro-F1 0.791 / mAP 0.855 at 5 against 0.814 / 0.874 at 20 on the sample posters at 384 px.
DEFAULT_PATIENCE = {CACHED: 20, THROUGH_BACKBONE: 5}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int | None = None  # None: DEFAULT_EPOCHS of the training path
    batch_size: int = 256  # global: split across replicas
    learning_rate: float = 1e-3
    hidden_units: int = 0
    dropout: float = 0.0
    loss: str = "bce"
    pos_weight: np.ndarray | None = None
    seed: int | None = None
    fine_tune_layers: int = 0
    fine_tune_learning_rate: float = 1e-4
    augment: str = "none"
    early_stopping_patience: int | None = None  # None: DEFAULT_PATIENCE of the training path
    # Fine-tuning first trains the head on cached features for at most this many epochs (early
    # stopping usually ends it sooner; an epoch on cached features takes well under a second).
    warm_start_epochs: int = 300
    feature_cache: str = "auto"  # "auto": cached-feature path when it applies; "off": never


@dataclasses.dataclass(frozen=True)
class OutputDirs:
    model_dir: str
    checkpoints: str
    backup: str
    logs: str
    feature_cache: str

    @classmethod
    def under(cls, model_dir: str, checkpoint_dir: str | None = None, log_dir: str | None = None) -> "OutputDirs":
        """The layout under `model_dir`; Vertex AI's AIP_CHECKPOINT_DIR / AIP_TENSORBOARD_LOG_DIR may move two of them."""
        return cls(
            model_dir=model_dir,
            checkpoints=checkpoint_dir or data.join_path(model_dir, "checkpoints"),
            backup=data.join_path(model_dir, "backup"),
            logs=log_dir or data.join_path(model_dir, "logs"),
            feature_cache=data.join_path(model_dir, "feature_cache"),
        )

    @property
    def history_csv(self) -> str:
        return data.join_path(self.model_dir, "history.csv")

    @property
    def best_weights(self) -> str:
        return data.join_path(self.checkpoints, "best")


@dataclasses.dataclass
class TrainResult:
    model: tf_keras.Model  # uint8 images [B,S,S,3] -> logits [B,K], best weights loaded
    path: str  # CACHED or THROUGH_BACKBONE
    history: dict[str, list[float]]  # every epoch, across restarts
    initial_epoch: int  # > 0 when this run resumed from a backup
    timings: dict[str, float]
    predict: Callable[[str], tuple[np.ndarray, np.ndarray] | None]  # split -> (probabilities, labels), None if empty


def uses_cached_features(config: TrainConfig) -> tuple[bool, str]:
    """Whether the cached-feature path applies, and why (for the log)."""
    if config.feature_cache == "off":
        return False, "--feature_cache off"
    if config.fine_tune_layers > 0:
        return False, "the backbone is fine-tuned (--fine_tune_layers), so its features change every step"
    if config.augment != "none":
        return False, f"--augment {config.augment} changes the images every epoch"
    return True, "frozen backbone and no augmentation"


class FeatureCache:
    """Backbone features per split as .npy files, keyed by what determines them.

    A restarted job with the same data, backbone and image size finds them and skips extraction.
    Files are written under a temporary name and renamed, so a killed job never leaves a partial one.
    """

    def __init__(self, root: str, info: data.DatasetInfo, backbone: model_lib.Backbone) -> None:
        key = {
            "data_dir": info.data_dir if "://" in info.data_dir else os.path.abspath(info.data_dir),
            "dataset_json_sha256": hashlib.sha256(json.dumps(info.meta, sort_keys=True).encode()).hexdigest(),
            "handle": backbone.path if "://" in backbone.path else os.path.abspath(backbone.path),
            "image_size": info.image_size,
        }
        self.directory = data.join_path(root, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])
        tf.io.gfile.makedirs(self.directory)
        with tf.io.gfile.GFile(data.join_path(self.directory, "key.json"), "w") as f:
            f.write(json.dumps(key, indent=2))

    def _paths(self, split: str) -> tuple[str, str]:
        return data.join_path(self.directory, f"{split}-features.npy"), data.join_path(self.directory, f"{split}-labels.npy")

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray] | None:
        paths = self._paths(split)
        if not all(tf.io.gfile.exists(p) for p in paths):
            return None
        arrays = []
        for path in paths:
            with tf.io.gfile.GFile(path, "rb") as f:
                arrays.append(np.load(io.BytesIO(f.read())))
        return arrays[0], arrays[1]

    def save(self, split: str, features: np.ndarray, labels: np.ndarray) -> None:
        for path, array in zip(self._paths(split), (features, labels)):
            buffer = io.BytesIO()
            np.save(buffer, array)
            with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
                f.write(buffer.getvalue())
            tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


class EpochTimer(tf_keras.callbacks.Callback):
    """Adds `epoch_time_s` to each epoch's logs (so CSVLogger and History record it)."""

    def __init__(self) -> None:
        super().__init__()
        self.first_epoch: int | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.first_epoch is None:
            self.first_epoch = epoch
            if epoch > 0:
                log.info("resumed from the backup: continuing at epoch %d", epoch + 1)
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["epoch_time_s"] = time.perf_counter() - self._start


def read_history(path: str) -> dict[str, list[float]]:
    """History from CSVLogger's file; an epoch logged twice (killed between its log line and its
    backup, then redone) keeps its last row."""
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path, "r") as f:
        rows = {int(row["epoch"]): row for row in csv.DictReader(f)}
    history: dict[str, list[float]] = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            # CSVLogger adds val_* columns filled with "NA" when there is no validation data.
            if key != "epoch" and value != "NA":
                history.setdefault(key, []).append(float(value))
    return history


def _extract_features(strategy: tf.distribute.Strategy, info: data.DatasetInfo, backbone: model_lib.Backbone,
                      cache: FeatureCache, batch_size: int, timings: dict[str, float]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    features = {}
    images, seconds = 0, 0.0
    extract = model_lib.BatchRunner(strategy, backbone.features)
    # Activation memory grows with batch x pixels, and the head's batch size says nothing about it.
    batch_size = min(batch_size, EXTRACTION_BATCH_SIZE * strategy.num_replicas_in_sync)
    for split in data.SPLITS:
        if info.split(split).examples == 0:
            continue
        cached = cache.load(split)
        if cached is not None:
            log.info("%s: reusing cached features %s from %s", split, cached[0].shape, cache.directory)
            features[split] = cached
            continue
        start = time.perf_counter()
        outputs, labels = extract(data.image_dataset(info, split, batch_size))
        elapsed = time.perf_counter() - start
        log.info("%s: extracted %s features in %.1f s (%.0f images/s)", split, outputs.shape, elapsed, len(outputs) / elapsed)
        cache.save(split, outputs, labels)
        features[split] = (outputs, labels)
        images, seconds = images + len(outputs), seconds + elapsed
    timings["feature_extraction_s"] = seconds
    if images:
        timings["feature_extraction_images_per_s"] = images / seconds
    return features


def _callbacks(dirs: OutputDirs, monitor: str, patience: int, resuming: bool) -> list[tf_keras.callbacks.Callback]:
    # Restarting from a backup must not let a worse post-restart epoch overwrite the best
    # checkpoint written before the kill. The monitor is a loss: lower is better.
    previous = read_history(dirs.history_csv).get(monitor) if resuming else None
    best_so_far = min(previous) if previous else None
    return [
        tf_keras.callbacks.TerminateOnNaN(),
        EpochTimer(),
        tf_keras.callbacks.ModelCheckpoint(dirs.best_weights, monitor=monitor, save_best_only=True,
                                           save_weights_only=True, initial_value_threshold=best_so_far),
        tf_keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True, verbose=1),
        tf_keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=0.5, patience=max(1, patience // 2), min_lr=1e-7, verbose=1),
        tf_keras.callbacks.TensorBoard(dirs.logs, write_graph=False),
        # Logged before the backup is written: a kill in between makes the epoch run twice
        # (read_history keeps the rerun's row) rather than vanish from the history.
        tf_keras.callbacks.CSVLogger(dirs.history_csv, append=True),
        tf_keras.callbacks.BackupAndRestore(dirs.backup),
    ]


def _warm_start_head(strategy: tf.distribute.Strategy, info: data.DatasetInfo, backbone: model_lib.Backbone,
                     head: tf_keras.Model, config: TrainConfig, dirs: OutputDirs, timings: dict[str, float]) -> None:
    """Trains `head` on cached features of the frozen backbone until early stopping, before fine-tuning.

    Unfreezing the backbone under a randomly initialised head sends large, noisy gradients into
    pre-trained weights and spends the first fine-tuning epochs (each a pass through the
    backbone) on what the cached features learn in seconds. Not checkpointed: a killed job redoes
    it from the feature cache, unless the fine-tuning stage has a backup (which holds the head).
    """
    cache = FeatureCache(dirs.feature_cache, info, backbone)
    features = _extract_features(strategy, info, backbone, cache, config.batch_size, timings)
    monitor = "val_loss" if "val" in features else "loss"
    patience = config.early_stopping_patience or DEFAULT_PATIENCE[CACHED]
    with strategy.scope():
        head.compile(optimizer=tf_keras.optimizers.Adam(config.learning_rate), loss=get_loss(config.loss, config.pos_weight))
    start = time.perf_counter()
    history = head.fit(
        data.feature_dataset(*features["train"], config.batch_size, training=True, seed=config.seed),
        validation_data=data.feature_dataset(*features["val"], config.batch_size) if "val" in features else None,
        epochs=config.warm_start_epochs, verbose=0,
        callbacks=[tf_keras.callbacks.EarlyStopping(monitor=monitor, patience=patience,
                                                    restore_best_weights=True),
                   tf_keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=0.5,
                                                        patience=max(1, patience // 2))])
    timings["warm_start_s"] = time.perf_counter() - start
    log.info("warm start: head trained on cached features for %d epochs (best %s %.4f) in %.1f s",
             len(history.epoch), monitor, min(history.history[monitor]), timings["warm_start_s"])


def train(strategy: tf.distribute.Strategy, info: data.DatasetInfo, backbone: model_lib.Backbone,
          config: TrainConfig, dirs: OutputDirs) -> TrainResult:
    """Trains the head (and the top of the backbone when fine-tuning) and returns the best model."""
    cached, reason = uses_cached_features(config)
    path = CACHED if cached else THROUGH_BACKBONE
    log.info("training path: %s (%s); %d replica(s) in sync", path, reason, strategy.num_replicas_in_sync)
    timings: dict[str, float] = {}
    has_val = info.split("val").examples > 0
    monitor = "val_loss" if has_val else "loss"
    size = info.image_size

    feature_dim = model_lib.feature_dim(strategy, backbone, size)
    with strategy.scope():
        head = model_lib.build_head(feature_dim, info.num_labels, config.hidden_units, config.dropout, config.seed)
    features = {}
    if cached:
        cache = FeatureCache(dirs.feature_cache, info, backbone)
        features = _extract_features(strategy, info, backbone, cache, config.batch_size, timings)
        train_data = data.feature_dataset(*features["train"], config.batch_size, training=True, seed=config.seed)
        val_data = data.feature_dataset(*features["val"], config.batch_size) if has_val else None
    else:
        train_data = data.image_dataset(info, "train", config.batch_size, training=True, seed=config.seed, augment=config.augment)
        val_data = data.image_dataset(info, "val", config.batch_size) if has_val else None

    resuming = tf.train.latest_checkpoint(data.join_path(dirs.backup, "chief")) is not None
    if config.fine_tune_layers > 0 and config.warm_start_epochs > 0 and config.feature_cache != "off" and not resuming:
        _warm_start_head(strategy, info, backbone, head, config, dirs, timings)

    with strategy.scope():
        if cached:
            fit_model = head
        elif config.fine_tune_layers > 0:
            fit_model = model_lib.build_classifier(backbone, head, size, model_lib.FineTuneModel)
            tuned = model_lib.top_variables(backbone, config.fine_tune_layers)
            fit_model.configure_fine_tuning(head.trainable_variables, tuned,
                                            tf_keras.optimizers.Adam(config.fine_tune_learning_rate))
            log.info("fine-tuning %d backbone variables (%s ... %s) at learning rate %g", len(tuned),
                     tuned[0].name, tuned[-1].name, config.fine_tune_learning_rate)
        else:
            fit_model = model_lib.build_classifier(backbone, head, size)
        fit_model.compile(
            optimizer=tf_keras.optimizers.Adam(config.learning_rate),
            loss=get_loss(config.loss, config.pos_weight),
            metrics=training_metrics(info.num_labels),
        )

    if not resuming and tf.io.gfile.exists(dirs.history_csv):
        tf.io.gfile.remove(dirs.history_csv)  # a finished earlier run in the same model_dir
    if not has_val:
        log.warning("the val split is empty: early stopping, LR schedule and checkpoints follow the TRAINING loss")
    callbacks = _callbacks(dirs, monitor, config.early_stopping_patience or DEFAULT_PATIENCE[path], resuming)
    start = time.perf_counter()
    epochs = config.epochs or DEFAULT_EPOCHS[path]
    fit_history = fit_model.fit(train_data, validation_data=val_data, epochs=epochs, callbacks=callbacks, verbose=2)
    timings["fit_s"] = time.perf_counter() - start
    if tf.io.gfile.exists(dirs.best_weights + ".index"):
        fit_model.load_weights(dirs.best_weights)  # the best epoch across restarts, not just this run
    initial_epoch = fit_history.epoch[0] if fit_history.epoch else epochs

    if cached:
        with strategy.scope():
            full_model = model_lib.build_classifier(backbone, head, size)
    else:
        full_model = fit_model

    # On the cached path the head on cached features computes what full_model computes on the images.
    probabilities = model_lib.BatchRunner(
        strategy, lambda x: tf.sigmoid((head if cached else full_model)(x, training=False))
    )

    def predict(split: str) -> tuple[np.ndarray, np.ndarray] | None:
        if info.split(split).examples == 0:
            return None
        if cached:
            return probabilities(data.feature_dataset(*features[split], config.batch_size))
        return probabilities(data.image_dataset(info, split, config.batch_size))

    return TrainResult(full_model, path, read_history(dirs.history_csv), initial_epoch, timings, predict)
