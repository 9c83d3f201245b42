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
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tf_keras

from tagbeam import export as model_files
from tagbeam import storage
from tagbeam.console import Progress
from tagbeam.dataset import SPLITS, DatasetInfo
from trainer import data
from trainer import model as model_lib
from trainer.config import CACHED, DEFAULT_PATIENCE, TrainOptions
from trainer.features import FeatureStore
from trainer.losses import get_loss, positive_weights
from trainer.metrics import training_metrics

log = logging.getLogger(__name__)

# On cached features an epoch takes 0.1-0.2 s and a backup about 20 ms (benchmarks/README.md,
# section 8): backing up every epoch cost 10-50 % of the fit in two measurements. A kill loses at
# most this much training.
CACHED_BACKUP_INTERVAL_S = 5.0


@dataclasses.dataclass(frozen=True)
class OutputDirs:
    model_dir: str
    checkpoints: str
    backup: str
    logs: str
    feature_cache: str

    @classmethod
    def under(cls, model_dir: str, checkpoint_dir: str | None = None, log_dir: str | None = None) -> OutputDirs:
        """The layout under `model_dir`; Vertex AI's AIP_CHECKPOINT_DIR / AIP_TENSORBOARD_LOG_DIR may move two of them."""
        return cls(
            model_dir=model_dir,
            checkpoints=checkpoint_dir or storage.join(model_dir, model_files.CHECKPOINTS_DIR),
            backup=storage.join(model_dir, model_files.BACKUP_DIR),
            logs=log_dir or storage.join(model_dir, model_files.LOGS_DIR),
            feature_cache=storage.join(model_dir, model_files.FEATURE_CACHE_DIR),
        )

    @property
    def history_csv(self) -> str:
        return storage.join(self.model_dir, model_files.HISTORY_CSV)

    @property
    def best_weights(self) -> str:
        return storage.join(self.checkpoints, "best")


@dataclasses.dataclass
class TrainResult:
    model: tf_keras.Model  # uint8 images [B,S,S,3] -> logits [B,K], best weights loaded
    path: str  # CACHED or THROUGH_BACKBONE
    history: dict[str, list[float]]  # every epoch, across restarts
    initial_epoch: int  # > 0 when this run resumed from a backup
    timings: dict[str, float]
    predict: Callable[[str], tuple[np.ndarray, np.ndarray] | None]  # split -> (probabilities, labels), None if empty


class FeatureCache:
    """Backbone features per split as .npy files, keyed by what determines them.

    A restarted job with the same data, backbone and image size finds them and skips extraction.
    Files are written under a temporary name and renamed, so a killed job never leaves a partial one.
    """

    def __init__(self, root: str, info: DatasetInfo, backbone: model_lib.Backbone) -> None:
        key = {
            "data_dir": info.data_dir if "://" in info.data_dir else os.path.abspath(info.data_dir),
            "dataset_json_sha256": hashlib.sha256(json.dumps(info.to_json(), sort_keys=True).encode()).hexdigest(),
            "handle": backbone.path if "://" in backbone.path else os.path.abspath(backbone.path),
            "image_size": info.image_size,
        }
        self.directory = storage.join(root, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])
        storage.write_json(storage.join(self.directory, "key.json"), key)

    def _paths(self, split: str) -> tuple[str, str]:
        return storage.join(self.directory, f"{split}-features.npy"), storage.join(self.directory, f"{split}-labels.npy")

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray] | None:
        paths = self._paths(split)
        if not all(storage.exists(p) for p in paths):
            return None
        try:
            features, labels = (np.load(io.BytesIO(storage.read_bytes(path))) for path in paths)
            if features.ndim != 2 or labels.ndim != 2 or len(features) != len(labels):
                raise ValueError(f"features of shape {features.shape} for labels of shape {labels.shape}")
        except Exception as err:  # noqa: BLE001 - whatever a cut-short file raises: a miss, extracted again
            log.warning("feature cache of %s in %s is unreadable (%s: %s): set aside, extracting again", split,
                        self.directory, type(err).__name__, err)
            for path in paths:
                storage.set_aside(path)
            return None
        return features, labels

    def save(self, split: str, features: np.ndarray, labels: np.ndarray) -> None:
        for path, array in zip(self._paths(split), (features, labels), strict=True):
            buffer = io.BytesIO()
            np.save(buffer, array)
            storage.write_bytes(path, buffer.getvalue())


class EpochProgress(tf_keras.callbacks.Callback):
    """Adds `epoch_time_s` to each epoch's logs (so CSVLogger and History record it), and logs one
    progress line every `every_s` seconds (and for the first and the last epoch) instead of Keras'
    line per epoch: a run on cached features does hundreds of sub-second epochs. Every epoch stays
    in history.csv and TensorBoard."""

    _SHOWN = ("loss", "val_loss", "macro_f1", "val_macro_f1")

    def __init__(self, epochs: int, monitor: str, every_s: float = 10.0) -> None:
        super().__init__()
        self._epochs, self._monitor, self._every_s = epochs, monitor, every_s
        self.first_epoch: int | None = None
        self._best: tuple[float, int] | None = None
        self._last_line = 0.0
        self._last: tuple[int, dict] | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.first_epoch is None:
            self.first_epoch = epoch
            if epoch > 0:
                log.info("resumed from the backup: continuing at epoch %d", epoch + 1)
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        logs["epoch_time_s"] = time.perf_counter() - self._start
        value = logs.get(self._monitor)
        if value is not None and (self._best is None or value < self._best[0]):
            self._best = (float(value), epoch + 1)
        self._last = (epoch, dict(logs))
        if epoch == self.first_epoch or time.monotonic() - self._last_line >= self._every_s:
            self._log_line(epoch, logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._last is None:
            return
        epoch, last = self._last
        if self._last_line and epoch != self.first_epoch:
            self._log_line(epoch, last)
        stopped = "early stopping" if epoch + 1 < self._epochs else "maximum epochs"
        best = f"best {self._monitor} {self._best[0]:.4f} at epoch {self._best[1]}" if self._best else ""
        log.info("training ended after epoch %d/%d (%s); %s", epoch + 1, self._epochs, stopped, best)

    def _log_line(self, epoch: int, logs: dict) -> None:
        self._last_line = time.monotonic()
        values = ", ".join(f"{k} {logs[k]:.4f}" for k in self._SHOWN if k in logs)
        lr = getattr(getattr(self.model, "optimizer", None), "learning_rate", None)
        rate = f", lr {float(tf_keras.backend.get_value(lr)):.2g}" if lr is not None else ""
        log.info("epoch %d/%d: %s%s (%.2f s/epoch)", epoch + 1, self._epochs, values, rate, logs["epoch_time_s"])


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


def extraction_batch(strategy: tf.distribute.Strategy, options: TrainOptions) -> int:
    """The global batch of a pass through the backbone that does not train (extraction, prediction):
    its size follows the device's memory, not the training batch."""
    return options.device_extraction_batch(model_lib.gpu_count()) * strategy.num_replicas_in_sync


def _extract_features(strategy: tf.distribute.Strategy, info: DatasetInfo, backbone: model_lib.Backbone,
                      cache: FeatureCache, options: TrainOptions, timings: dict[str, float]
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    features = {}
    images, seconds = 0, 0.0
    store = _feature_store(options, info, backbone)
    extract = model_lib.BatchRunner(strategy, backbone.features, options.device_jit_compile(model_lib.gpu_count()))
    batch_size = extraction_batch(strategy, options)
    for split in SPLITS:
        if info.split(split).examples == 0:
            continue
        cached = cache.load(split)
        if cached is not None:
            log.info("%s: reusing cached features %s from %s", split, cached[0].shape, cache.directory)
            features[split] = cached
            continue
        start = time.perf_counter()

        def through_backbone(only: np.ndarray | None, split: str = split) -> tuple[np.ndarray, np.ndarray]:
            count = info.split(split).examples if only is None else int(only.sum())
            progress = Progress(log, f"{split}: backbone features", count)
            result = extract(data.image_dataset(info, split, batch_size, only=only), progress)
            progress.finish()
            return result

        if store is None:
            outputs, labels = through_backbone(None)
            extracted = len(outputs)
        else:
            outputs, labels, extracted = store.split_features(info, split, lambda only: through_backbone(only)[0])
        elapsed = time.perf_counter() - start
        cache.save(split, outputs, labels)
        features[split] = (outputs, labels)
        images, seconds = images + extracted, seconds + elapsed
    timings["feature_extraction_s"] = seconds
    timings["feature_extraction_images"] = images
    if images:
        timings["feature_extraction_images_per_s"] = images / seconds
    return features


def _feature_store(options: TrainOptions, info: DatasetInfo, backbone: model_lib.Backbone) -> FeatureStore | None:
    return FeatureStore(options.feature_store, info, backbone.path) if options.feature_store else None


class PeriodicBackup(tf_keras.callbacks.BackupAndRestore):
    """BackupAndRestore that backs up after the first epoch and then at most every `every_s` seconds."""

    def __init__(self, backup_dir: str, every_s: float) -> None:
        super().__init__(backup_dir)
        self._every_s = every_s
        self._last: float | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.monotonic()
        if self._last is None or now - self._last >= self._every_s:
            super().on_epoch_end(epoch, logs)
            self._last = now


def _callbacks(dirs: OutputDirs, monitor: str, patience: int, resuming: bool, epochs: int, backup_every_s: float
               ) -> list[tf_keras.callbacks.Callback]:
    # Restarting from a backup must not let a worse post-restart epoch overwrite the best
    # checkpoint written before the kill. The monitor is a loss: lower is better.
    previous = read_history(dirs.history_csv).get(monitor) if resuming else None
    best_so_far = min(previous) if previous else None
    return [
        tf_keras.callbacks.TerminateOnNaN(),
        EpochProgress(epochs, monitor),
        tf_keras.callbacks.ModelCheckpoint(dirs.best_weights, monitor=monitor, save_best_only=True,
                                           save_weights_only=True, initial_value_threshold=best_so_far),
        tf_keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True),
        tf_keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=0.5, patience=max(1, patience // 2), min_lr=1e-7),
        tf_keras.callbacks.TensorBoard(dirs.logs, write_graph=False),
        # Logged before the backup is written: a kill in between makes the epoch run twice
        # (read_history keeps the rerun's row) rather than vanish from the history.
        tf_keras.callbacks.CSVLogger(dirs.history_csv, append=True),
        PeriodicBackup(dirs.backup, backup_every_s),
    ]


def _pos_weight(info: DatasetInfo, options: TrainOptions) -> np.ndarray | None:
    if not options.positive_weights:
        return None
    return positive_weights(info.label_count_vector("train"), info.split("train").examples)


@dataclasses.dataclass
class Inputs:
    """What the fit reads: cached features per split (cached path only) and the train/val datasets."""

    features: dict[str, tuple[np.ndarray, np.ndarray]]
    train: tf.data.Dataset
    val: tf.data.Dataset | None


def prepare_inputs(strategy: tf.distribute.Strategy, info: DatasetInfo, backbone: model_lib.Backbone,
                   options: TrainOptions, dirs: OutputDirs, timings: dict[str, float], cached: bool) -> Inputs:
    """Stage 1: backbone features of every split (cached path), or image datasets (through the backbone)."""
    has_val = info.split("val").examples > 0
    if cached:
        features = _extract_features(strategy, info, backbone, FeatureCache(dirs.feature_cache, info, backbone),
                                     options, timings)
        return Inputs(features,
                      data.feature_dataset(*features["train"], options.batch_size, training=True, seed=options.seed),
                      data.feature_dataset(*features["val"], options.batch_size) if has_val else None)
    return Inputs({}, data.image_dataset(info, "train", options.batch_size, training=True, seed=options.seed,
                                         augment=options.augment),
                  data.image_dataset(info, "val", options.batch_size) if has_val else None)


def warm_start_head(strategy: tf.distribute.Strategy, info: DatasetInfo, backbone: model_lib.Backbone,
                    head: tf_keras.Model, options: TrainOptions, dirs: OutputDirs, timings: dict[str, float]) -> None:
    """Stage 2 (fine-tuning only): trains `head` on cached features of the frozen backbone until early
    stopping.

    Unfreezing the backbone under a randomly initialised head sends large, noisy gradients into
    pre-trained weights and spends the first fine-tuning epochs (each a pass through the
    backbone) on what the cached features learn in seconds. Not checkpointed: a killed job redoes
    it from the feature cache, unless the fine-tuning stage has a backup (which holds the head).
    """
    cache = FeatureCache(dirs.feature_cache, info, backbone)
    features = _extract_features(strategy, info, backbone, cache, options, timings)
    monitor = "val_loss" if "val" in features else "loss"
    patience = options.early_stopping_patience or DEFAULT_PATIENCE[CACHED]
    with strategy.scope():
        head.compile(optimizer=tf_keras.optimizers.Adam(options.learning_rate),
                     loss=get_loss(options.loss, _pos_weight(info, options)),
                     jit_compile=options.device_jit_compile(model_lib.gpu_count()))
    start = time.perf_counter()
    history = head.fit(
        data.feature_dataset(*features["train"], options.batch_size, training=True, seed=options.seed),
        validation_data=data.feature_dataset(*features["val"], options.batch_size) if "val" in features else None,
        epochs=options.warm_start_epochs, verbose=0,
        callbacks=[tf_keras.callbacks.EarlyStopping(monitor=monitor, patience=patience,
                                                    restore_best_weights=True),
                   tf_keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=0.5,
                                                        patience=max(1, patience // 2))])
    timings["warm_start_s"] = time.perf_counter() - start
    log.info("warm start: head trained on cached features for %d epochs (best %s %.4f) in %.1f s",
             len(history.epoch), monitor, min(history.history[monitor]), timings["warm_start_s"])


def head_strategy(strategy: tf.distribute.Strategy, cached: bool) -> tf.distribute.Strategy:
    """Where the head lives: on cached features, the default (no) strategy.

    There each step is a [batch, D] x [D, K] product: replicas add nothing but their
    synchronisation, which made an epoch 4x slower on one replica (0.51 vs 0.13 s on the sample
    posters, benchmarks/README.md). Through the backbone the head trains with it, on every replica.
    """
    return tf.distribute.get_strategy() if cached else strategy


def compile_fit_model(strategy: tf.distribute.Strategy, info: DatasetInfo, backbone: model_lib.Backbone,
                      head: tf_keras.Model, options: TrainOptions, cached: bool) -> tf_keras.Model:
    """Stage 3: the model that `fit` trains - the head alone on cached features, else backbone + head
    (with the top backbone variables on their own optimizer when fine-tuning)."""
    with head_strategy(strategy, cached).scope():
        if cached:
            fit_model = head
        elif options.fine_tune_layers > 0:
            fit_model = model_lib.build_classifier(backbone, head, info.image_size, model_lib.FineTuneModel)
            tuned = model_lib.top_variables(backbone, options.fine_tune_layers)
            fit_model.configure_fine_tuning(head.trainable_variables, tuned,
                                            tf_keras.optimizers.Adam(options.fine_tune_learning_rate))
            log.info("fine-tuning %d backbone variables (%s ... %s) at learning rate %g", len(tuned),
                     tuned[0].name, tuned[-1].name, options.fine_tune_learning_rate)
        else:
            fit_model = model_lib.build_classifier(backbone, head, info.image_size)
        fit_model.compile(
            optimizer=tf_keras.optimizers.Adam(options.learning_rate),
            loss=get_loss(options.loss, _pos_weight(info, options)),
            metrics=training_metrics(info.num_labels),
            jit_compile=options.device_jit_compile(model_lib.gpu_count()),
        )
    return fit_model


def fit(fit_model: tf_keras.Model, inputs: Inputs, options: TrainOptions, dirs: OutputDirs, resuming: bool,
        timings: dict[str, float]) -> int:
    """Stage 4: fits with the callbacks until early stopping, then loads the best weights across
    restarts. Returns the epoch this run started at (> 0 after a resume)."""
    monitor = "val_loss" if inputs.val is not None else "loss"
    if not resuming and tf.io.gfile.exists(dirs.history_csv):
        tf.io.gfile.remove(dirs.history_csv)  # a finished earlier run in the same model_dir
    if inputs.val is None:
        log.warning("the val split is empty: early stopping, LR schedule and checkpoints follow the TRAINING loss")
    epochs = options.max_epochs
    backup_every_s = CACHED_BACKUP_INTERVAL_S if options.path == CACHED else 0.0
    callbacks = _callbacks(dirs, monitor, options.patience, resuming, epochs, backup_every_s)
    start = time.perf_counter()
    fit_history = fit_model.fit(inputs.train, validation_data=inputs.val, epochs=epochs, callbacks=callbacks, verbose=0)
    timings["fit_s"] = time.perf_counter() - start
    if tf.io.gfile.exists(dirs.best_weights + ".index"):
        fit_model.load_weights(dirs.best_weights)  # the best epoch across restarts, not just this run
    return fit_history.epoch[0] if fit_history.epoch else epochs


def train(strategy: tf.distribute.Strategy, info: DatasetInfo, backbone: model_lib.Backbone,
          options: TrainOptions, dirs: OutputDirs) -> TrainResult:
    """Trains the head (and the top of the backbone when fine-tuning) and returns the best model."""
    cached, reason = options.uses_cached_features()
    path = options.path
    log.info("training path: %s (%s); %d replica(s) in sync", path, reason, strategy.num_replicas_in_sync)
    timings: dict[str, float] = {}
    size = info.image_size

    feature_dim = model_lib.feature_dim(strategy, backbone, size)
    with head_strategy(strategy, cached).scope():
        head = model_lib.build_head(feature_dim, info.num_labels, options.hidden_units, options.dropout, options.seed)
    inputs = prepare_inputs(strategy, info, backbone, options, dirs, timings, cached)
    resuming = tf.train.latest_checkpoint(storage.join(dirs.backup, "chief")) is not None
    if options.fine_tune_layers > 0 and options.warm_start_epochs > 0 and options.feature_cache != "off" and not resuming:
        warm_start_head(strategy, info, backbone, head, options, dirs, timings)
    fit_model = compile_fit_model(strategy, info, backbone, head, options, cached)
    initial_epoch = fit(fit_model, inputs, options, dirs, resuming, timings)

    if cached:
        with strategy.scope():
            full_model = model_lib.build_classifier(backbone, head, size)
    else:
        full_model = fit_model

    # On the cached path the head on cached features computes what full_model computes on the images.
    probabilities = model_lib.BatchRunner(
        head_strategy(strategy, cached), lambda x: tf.sigmoid((head if cached else full_model)(x, training=False)),
        options.device_jit_compile(model_lib.gpu_count()))

    def predict(split: str) -> tuple[np.ndarray, np.ndarray] | None:
        if info.split(split).examples == 0:
            return None
        if cached:
            return probabilities(data.feature_dataset(*inputs.features[split], options.batch_size))
        return probabilities(data.image_dataset(info, split, extraction_batch(strategy, options)))

    return TrainResult(full_model, path, read_history(dirs.history_csv), initial_epoch, timings, predict)
