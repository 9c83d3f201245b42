"""Distribution strategy, TF Hub backbone and classification head (tf_keras only, never tf.keras).

The model maps uint8 images [B,S,S,3] (the pixels as stored) to LOGITS [B,K]; it converts them to
the [0, 1] floats a TF Hub image backbone takes itself. Probabilities are the logits' sigmoid
(losses and metrics take logits for numerical stability).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
from typing import Callable

import numpy as np
import tensorflow as tf
from trainer.hub import hub
import tf_keras

from tagbeam.console import Progress
from trainer.embedded_backbone import INFO_FILE

log = logging.getLogger(__name__)


class BackboneError(ValueError):
    """The --hub_handle cannot be loaded or does not fit the dataset; the message says what to do."""


def setup_strategy(cpu_replicas: int = 1) -> tf.distribute.MirroredStrategy:
    """MirroredStrategy over every visible GPU, or over `cpu_replicas` logical CPUs without one.

    Splitting the CPU must happen before TensorFlow initialises its devices. If the CPU is
    already split (a test harness did it) or the runtime is already initialised, the existing
    devices are used as they are: the replica count is then whatever was configured.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy()  # NCCL all-reduce across the GPUs
    if cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        existing = tf.config.get_logical_device_configuration(cpu)
        if existing:
            if len(existing) != cpu_replicas:
                log.warning("the CPU is already split into %d logical devices; --cpu_replicas %d ignored", len(existing), cpu_replicas)
        else:
            try:
                tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
            except RuntimeError as e:  # devices already initialised in this process
                log.warning("cannot split the CPU into %d devices (%s); using the devices as they are", cpu_replicas, e)
    # Every logical CPU becomes a replica. Its default CPU all-reduce uses collective ops, which
    # every MirroredStrategy numbers from the same keys while the runtime caches their shapes by
    # key: a second strategy in one process (a notebook, a test session) then fails with "Shape
    # mismatch in the collective instance". Reducing on one device has no such keys.
    return tf.distribute.MirroredStrategy(cross_device_ops=tf.distribute.ReductionToOneDevice())


class NonEmptyBatch(tf_keras.layers.Layer):
    """Calls the wrapped backbone on at least one image and returns the rows of the real ones.

    Takes uint8 images [B,S,S,3] (or float ones in [0, 1]).

    MirroredStrategy splits a short last batch by filling replicas in order, so a replica can get
    an EMPTY batch, and TF 2.21's oneDNN conv2d returns its input unchanged for an empty batch
    (shape [0,H,W,3] instead of [0,H',W',C]), which breaks every conv backbone there. Padding one
    blank image in that case costs nothing otherwise and keeps gradients a plain slice.
    """

    def __init__(self, backbone: tf_keras.layers.Layer, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, images: tf.Tensor) -> tf.Tensor:
        # uint8 pixels (what trainer.data and the serving signature hand over) become [0, 1] here,
        # inside the model: on an accelerator the host never builds float batches 4x their size.
        # Float input is taken as already in [0, 1] (convert_image_dtype leaves it unchanged).
        images = tf.image.convert_image_dtype(images, tf.float32)
        count = tf.shape(images)[0]
        padded = tf.pad(images, [[0, tf.maximum(0, 1 - count)], [0, 0], [0, 0], [0, 0]])
        # training=False even when fine-tuning: batch-norm statistics stay those of pre-training
        # (small per-replica batches would wreck them); unfrozen weights still get gradients.
        return self.backbone(padded, training=False)[:count]


@dataclasses.dataclass(frozen=True)
class Backbone:
    layer: hub.KerasLayer
    features: NonEmptyBatch  # what callers use: uint8 images [B,S,S,3] -> features [B,D], safe for B = 0
    loaded: object  # the restored SavedModel object the layer wraps
    handle: str
    path: str  # the resolved SavedModel directory
    fixed_size: int | None  # spatial size the traced signature requires, if it fixes one
    nominal_size: int | None  # input size declared in tagbeam_backbone.json
    info: dict  # tagbeam_backbone.json, or {}


def _handle_error(handle: str, reason: str) -> BackboneError:
    return BackboneError(
        f"--hub_handle {handle} cannot be loaded: {reason}. tfhub.dev and Kaggle are not reachable from "
        "machines without internet access: omit --hub_handle to use the embedded MobileNetV2 "
        "(trainer.embedded_backbone), or pass a local or gs:// path to a TF2 SavedModel feature vector."
    )


def _fixed_input_size(loaded: object) -> int | None:
    """The H (=W) that every traced `__call__` signature fixes, or None if any is dynamic."""
    sizes = set()
    for function in getattr(loaded.__call__, "concrete_functions", []):
        args, _ = function.structured_input_signature
        spec = args[0] if args else None
        if not isinstance(spec, tf.TensorSpec) or spec.shape.rank != 4:
            return None
        sizes.add((spec.shape[1], spec.shape[2]))
    if len(sizes) == 1:
        height, width = sizes.pop()
        if height is not None and height == width:
            return int(height)
    return None


def load_backbone(handle: str, trainable: bool = False) -> Backbone:
    """Loads `handle` as a `hub.KerasLayer`; call it inside `strategy.scope()`.

    Resolving first turns an offline tfhub.dev URL or a wrong path into one clear error rather
    than a stack trace from deep inside the loader.
    """
    try:
        path = hub.resolve(handle)
    except Exception as e:  # URLError offline, HTTP errors, bad Kaggle handles
        raise _handle_error(handle, f"{type(e).__name__}: {e}") from e
    if not tf.io.gfile.exists(posixpath.join(path, "saved_model.pb")):
        raise _handle_error(handle, f"no saved_model.pb in {path}")
    try:
        loaded = hub.load(path)
        layer = hub.KerasLayer(loaded, trainable=trainable, name="backbone")
    except Exception as e:
        raise _handle_error(handle, f"{type(e).__name__}: {e}") from e
    info = {}
    info_path = posixpath.join(path, INFO_FILE)  # tagbeam_backbone.json: declared input size etc.
    if tf.io.gfile.exists(info_path):
        with tf.io.gfile.GFile(info_path) as f:
            info = json.load(f)
    nominal = info.get("input_size")
    return Backbone(
        layer=layer,
        features=NonEmptyBatch(layer, name="backbone_features"),
        loaded=loaded,
        handle=handle,
        path=path,
        fixed_size=_fixed_input_size(loaded),
        nominal_size=int(nominal) if nominal else None,
        info=info,
    )


def check_image_size(backbone: Backbone, image_size: int) -> None:
    """Refuses a dataset whose images a fixed-size backbone cannot take; warns when off nominal."""
    if backbone.fixed_size is not None and backbone.fixed_size != image_size:
        raise BackboneError(
            f"--hub_handle {backbone.handle} takes {backbone.fixed_size}x{backbone.fixed_size} images but the "
            f"dataset holds {image_size}x{image_size}: rerun `python -m pipelines.preprocess` with "
            f"--image_size {backbone.fixed_size}, or pick a backbone that accepts {image_size}"
        )
    # Larger inputs than the backbone's training size are a choice (several small objects per image
    # then appear at the scale the backbone learned); smaller ones lose detail it relies on.
    if backbone.nominal_size and image_size < backbone.nominal_size:
        log.warning(
            "backbone %s was trained at %dx%d; this dataset is %dx%d (it accepts any size, but features may be weaker)",
            backbone.handle, backbone.nominal_size, backbone.nominal_size, image_size, image_size,
        )


def feature_dim(strategy: tf.distribute.Strategy, backbone: Backbone, image_size: int) -> int:
    """The backbone's output width, from one blank image run in a replica context (restored
    SavedModel functions refuse the cross-replica context that plain eager calls get in a scope)."""
    @tf.function
    def probe() -> tf.Tensor:
        blank = tf.zeros([1, image_size, image_size, 3], tf.uint8)
        return strategy.run(backbone.features, args=(blank,))

    return int(strategy.experimental_local_results(probe())[0].shape[-1])


def build_head(feature_dim: int, num_labels: int, hidden_units: int = 0, dropout: float = 0.0,
               seed: int | None = None) -> tf_keras.Model:
    """features [B,D] -> logits [B,K]: optional Dense(hidden_units, relu) + Dropout, then Dense(K)."""
    features = tf_keras.Input([feature_dim], name="features")
    x = features
    if hidden_units > 0:
        x = tf_keras.layers.Dense(hidden_units, activation="relu",
                                  kernel_initializer=tf_keras.initializers.GlorotUniform(seed), name="hidden")(x)
    if dropout > 0:
        x = tf_keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    seed_out = None if seed is None else seed + 1
    logits = tf_keras.layers.Dense(num_labels, kernel_initializer=tf_keras.initializers.GlorotUniform(seed_out),
                                   name="logits")(x)
    return tf_keras.Model(features, logits, name="head")


class FineTuneModel(tf_keras.Model):
    """A functional model whose train step updates the head with the compiled optimizer and the
    chosen top backbone variables with a second, slower one (Keras has no per-layer learning rates).
    """

    def configure_fine_tuning(self, head_variables: list[tf.Variable], backbone_variables: list[tf.Variable],
                              backbone_optimizer: tf_keras.optimizers.Optimizer) -> None:
        self._head_variables = head_variables
        self._tuned_variables = backbone_variables
        self.backbone_optimizer = backbone_optimizer  # tracked: BackupAndRestore saves its slots too

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            logits = self(x, training=True)
            loss = self.compute_loss(x, y, logits)
        gradients = tape.gradient(loss, self._head_variables + self._tuned_variables)
        split = len(self._head_variables)
        self.optimizer.apply_gradients(zip(gradients[:split], self._head_variables))
        self.backbone_optimizer.apply_gradients(zip(gradients[split:], self._tuned_variables))
        return self.compute_metrics(x, y, logits, None)


def build_classifier(backbone: Backbone, head: tf_keras.Model, image_size: int,
                     model_class: type[tf_keras.Model] = tf_keras.Model) -> tf_keras.Model:
    """uint8 images [B,S,S,3] -> logits [B,K], sharing `head`'s weights.

    The input is uint8 because a functional model casts whatever it is given to its input's dtype
    (a float input would turn pixels 0..255 into values the backbone never saw)."""
    images = tf_keras.Input([image_size, image_size, 3], dtype=tf.uint8, name="images")
    return model_class(images, head(backbone.features(images)), name="tagger")


def top_variables(backbone: Backbone, count: int) -> list[tf.Variable]:
    """The last `count` trainable backbone variables: the top of the network for SavedModels that
    list variables in forward order, as Keras models and trainer.embedded_backbone do."""
    candidates = list(getattr(backbone.loaded, "trainable_variables", []))
    if count > len(candidates):
        raise BackboneError(f"--fine_tune_layers {count}: {backbone.handle} has only {len(candidates)} trainable variables")
    return candidates[len(candidates) - count:]


def _pad_rows(tensor: tf.Tensor, rows: int) -> tf.Tensor:
    extra = rows - tf.shape(tensor)[0]
    return tf.pad(tensor, tf.concat([[[0, extra]], tf.zeros([tf.rank(tensor) - 1, 2], tf.int32)], axis=0))


class BatchRunner:
    """Applies `fn` to every batch of an (inputs, labels) dataset on all replicas.

    Returns (outputs, labels) in the dataset's order: each global batch is split across replicas
    in order and the per-replica results are concatenated back in that order, so outputs stay
    aligned with the labels that travelled with them. A short last batch is padded only to a
    multiple of the replica count (so every replica gets the same number of rows) and the padding
    dropped afterwards: padding it to the global batch would push up to a whole batch of blank
    images through the backbone per split.

    The step is traced once per element spec, with a dynamic batch dimension, and reused for
    every split (no retracing for each split's short last batch). With one replica there is
    nothing to distribute and the step runs on plain batches; with several, the loop counts the
    batches instead of running the distributed iterator to its end, which is where the per-split
    stall was (after the last batch was back, 58 s on the 1,603-image train split and several
    seconds per 200-image split, 1 replica at 384 px, benchmarks/README.md).
    """

    def __init__(self, strategy: tf.distribute.Strategy, fn: Callable[[tf.Tensor], tf.Tensor]) -> None:
        self._strategy = strategy
        self._fn = fn
        self._replicas = strategy.num_replicas_in_sync
        # Across workers every worker has as many local replicas as it has devices, but the
        # replicas in sync count them all.
        self._distributed = self._replicas > 1
        self._step = None
        self._spec = None

    def _step_for(self, spec: tuple) -> Callable:
        if self._step is None or spec != self._spec:
            strategy, fn = self._strategy, self._fn
            if self._distributed:
                def step(inputs, labels, real):
                    return strategy.run(lambda x, y, r: (fn(x), y, r), args=(inputs, labels, real))
            else:
                def step(inputs, labels, real):
                    return fn(inputs), labels, real
            self._step, self._spec = tf.function(step, input_signature=list(spec)), spec
        return self._step

    def __call__(self, dataset: tf.data.Dataset, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
        def pad(inputs: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            count = tf.shape(inputs)[0]
            rows = -(-count // self._replicas) * self._replicas
            real = tf.range(rows) < count
            return _pad_rows(inputs, rows), _pad_rows(labels, rows), real

        dataset = dataset.map(pad)
        batches = int(dataset.cardinality())
        if batches < 0:
            raise ValueError("BatchRunner needs a dataset of known cardinality (trainer.data batches have one)")
        if self._distributed:
            dataset = self._strategy.experimental_distribute_dataset(dataset)
            local = self._strategy.experimental_local_results
        else:
            local = lambda values: (values,)  # noqa: E731
        step = self._step_for(dataset.element_spec)
        outputs, labels, real = [], [], []
        iterator = iter(dataset)
        # A counted loop, never asking for the element after the last: reaching the end of a
        # distributed iterator stalled for 10-60 s per split (measured on 1 replica at 384 px).
        for _ in range(batches):
            batch = next(iterator)
            for results, values in zip((outputs, labels, real), step(*batch)):
                results.extend(t.numpy() for t in local(values))
            if progress:
                progress.update(int(sum(r.sum() for r in real[-len(local(batch[2])):])))
        if not outputs:
            raise ValueError("BatchRunner got an empty dataset")
        keep = np.concatenate(real)
        return np.concatenate(outputs)[keep], np.concatenate(labels)[keep]
