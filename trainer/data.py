"""Reads a dataset directory (docs/dataset.md) into tf.data pipelines.

Labels, their order, the image size and format all come from the directory itself
(`dataset.json` and `labels.txt`); paths may be local or gs:// (everything goes through
tf.io.gfile and tf.data).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
from typing import Any

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_FORMATS = ("jpeg", "png")
SHARD_COMPRESSIONS = ("none", "gzip")
AUGMENTATIONS = ("none", "flip", "dihedral")
# Bounded so a large split's shuffle buffer of encoded examples stays well under a few GB;
# shard-order shuffling adds mixing beyond it.
MAX_SHUFFLE_BUFFER = 10_000
# Shards read at once: enough parallel GCS streams to keep a GPU fed (a plain sequential read
# of GCS shards is the classic input bottleneck), few enough to bound memory.
MAX_CYCLE_LENGTH = 16


class DatasetError(ValueError):
    """The dataset directory is missing, incomplete or inconsistent; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    name: str
    examples: int
    files: tuple[str, ...]  # full paths of the split's TFRecord shards
    label_counts: np.ndarray  # int64 [K], positives per label in labels.txt order


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    data_dir: str
    dataset_json: str  # path of dataset.json
    labels: tuple[str, ...]
    image_size: int
    image_format: str
    resize_policy: str
    splits: dict[str, SplitInfo]
    meta: dict[str, Any]  # dataset.json as written by the pipeline

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def compression_type(self) -> str:
        """tf.data's compression_type for the shards: "" or "GZIP" (datasets that do not say are GZIP)."""
        return {"none": "", "gzip": "GZIP"}[self.meta.get("shard_compression", "gzip")]

    @property
    def stored_jpeg(self) -> tuple[int, str] | None:
        """(quality, chroma subsampling) of the stored JPEGs, None when images are PNG. Datasets
        written before the pipeline recorded the subsampling hold 4:4:4 JPEGs."""
        if self.image_format != "jpeg":
            return None
        return int(self.meta.get("jpeg_quality", 95)), str(self.meta.get("jpeg_subsampling", "4:4:4"))

    def split(self, name: str) -> SplitInfo:
        """The split's info; a split absent from dataset.json is an empty split."""
        return self.splits.get(name) or SplitInfo(name, 0, (), np.zeros(self.num_labels, np.int64))


def join_path(base: str, name: str) -> str:
    """`base`/`name` for local paths and URLs such as gs:// alike."""
    return posixpath.join(base.rstrip("/"), name) if "://" in base else tf.io.gfile.join(base, name)


def _read_text(path: str) -> str:
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read()


def _require(meta: dict, key: str, kind: type, path: str) -> Any:
    if key not in meta:
        raise DatasetError(f"{path} has no {key!r}: it was not written by `python -m pipelines.preprocess` (docs/dataset.md)")
    value = meta[key]
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise DatasetError(f"{path}: {key!r} must be {kind.__name__}, got {value!r}")
    return value


def read_dataset_info(data_dir: str) -> DatasetInfo:
    """Reads and checks `dataset.json` and `labels.txt` in `data_dir` (local or gs://)."""
    json_path = join_path(data_dir, "dataset.json")
    if not tf.io.gfile.exists(json_path):
        hint = ("its listing shows no dataset directory" if not tf.io.gfile.exists(data_dir)
                else "the pipeline writes dataset.json last, so it may also be incomplete")
        raise DatasetError(
            f"--data_dir {data_dir}: no dataset.json ({hint}). Run `python -m pipelines.preprocess` "
            "to create the dataset directory first, or check the path."
        )
    try:
        meta = json.loads(_read_text(json_path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{json_path} is not valid JSON ({e}); rerun `python -m pipelines.preprocess`") from e
    labels = tuple(_require(meta, "labels", list, json_path))
    num_labels = _require(meta, "num_labels", int, json_path)
    image_size = _require(meta, "image_size", int, json_path)
    image_format = _require(meta, "image_format", str, json_path)
    resize_policy = _require(meta, "resize_policy", str, json_path)
    split_meta = _require(meta, "splits", dict, json_path)
    if num_labels != len(labels) or num_labels < 1:
        raise DatasetError(f"{json_path}: num_labels={num_labels} but {len(labels)} labels are listed")
    if image_format not in IMAGE_FORMATS:
        raise DatasetError(f"{json_path}: image_format {image_format!r} is not one of {IMAGE_FORMATS}")
    if meta.get("shard_compression", "gzip") not in SHARD_COMPRESSIONS:
        raise DatasetError(f"{json_path}: shard_compression {meta['shard_compression']!r} is not one of "
                           f"{SHARD_COMPRESSIONS}")

    labels_path = join_path(data_dir, "labels.txt")
    if not tf.io.gfile.exists(labels_path):
        raise DatasetError(f"{labels_path} is missing: the dataset directory is incomplete; rerun `python -m pipelines.preprocess`")
    listed = tuple(line for line in _read_text(labels_path).splitlines() if line)
    if listed != labels:
        raise DatasetError(
            f"{labels_path} ({len(listed)} labels) disagrees with the labels in {json_path} ({len(labels)}); "
            "the directory mixes two pipeline runs: rerun `python -m pipelines.preprocess` into an empty folder"
        )

    present = set(tf.io.gfile.listdir(data_dir))
    splits = {}
    for name, info in split_meta.items():
        files = tuple(info.get("files", []))
        missing = [f for f in files if f not in present]
        if missing:
            raise DatasetError(f"{json_path} lists {len(missing)} {name} shard(s) missing from {data_dir}, e.g. {missing[0]}")
        counts = info.get("label_counts", {})
        splits[name] = SplitInfo(
            name=name,
            examples=int(info.get("examples", 0)),
            files=tuple(join_path(data_dir, f) for f in files),
            label_counts=np.array([int(counts.get(label, 0)) for label in labels], np.int64),
        )
    return DatasetInfo(data_dir, json_path, labels, image_size, image_format, resize_policy, splits, meta)


def shuffle_buffer(examples: int) -> int:
    """The example shuffle buffer for a split of `examples`; the cached-feature path uses the same."""
    return max(1, min(examples, MAX_SHUFFLE_BUFFER))


def _records(split: SplitInfo, compression_type: str, training: bool, seed: int | None) -> tf.data.Dataset:
    """Serialized examples of `split`: a deterministic order unless training without a seed."""
    files = tf.data.Dataset.list_files(list(split.files), shuffle=training, seed=seed)
    deterministic = seed is not None or not training
    return files.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type=compression_type),
        cycle_length=max(1, min(len(split.files), MAX_CYCLE_LENGTH)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )


def _parser(info: DatasetInfo):
    spec = {
        "id": tf.io.FixedLenFeature([], tf.string),
        "image": tf.io.FixedLenFeature([], tf.string),
        "labels": tf.io.FixedLenFeature([info.num_labels], tf.int64),
    }
    size = info.image_size

    def decode(data: tf.Tensor) -> tf.Tensor:
        if info.image_format == "jpeg":
            # Pillow's (and serving's) decoder: TF's default fast DCT is off by ~1.3 levels on average.
            return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
        return tf.io.decode_png(data, channels=3)

    def parse(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        example = tf.io.parse_single_example(serialized, spec)
        return tf.ensure_shape(decode(example["image"]), [size, size, 3]), tf.cast(example["labels"], tf.float32)

    return parse


def _augmenter(augment: str, seed: int | None):
    def flip(image: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.image.random_flip_left_right(image, seed=seed), labels

    def dihedral(image: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # One of the 8 symmetries of the square: a flip and 0-3 quarter turns. Label-preserving
        # for overhead imagery (Planet chips), not for posters - hence opt-in.
        turns = tf.random.uniform([], 0, 4, tf.int32, seed=seed)
        return tf.image.rot90(tf.image.random_flip_left_right(image, seed=seed), turns), labels

    return {"flip": flip, "dihedral": dihedral}[augment]


def image_dataset(
    info: DatasetInfo,
    split: str,
    global_batch_size: int,
    *,
    training: bool = False,
    seed: int | None = None,
    augment: str = "none",
) -> tf.data.Dataset:
    """(uint8 images [B,S,S,3], the pixels as stored; float32 multi-hot [B,K]) batches of `split`.

    Training shuffles shard order and examples (reproducibly when `seed` is set), applies
    `augment` and drops a short last batch; evaluation reads every example with shards in their
    stored order. Batches hold the GLOBAL batch size: under MirroredStrategy Keras splits each
    across the replicas.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    split_info = info.split(split)
    if not split_info.files:
        raise DatasetError(f"the {split} split of {info.data_dir} has no shards")
    deterministic = seed is not None or not training
    dataset = _records(split_info, info.compression_type, training, seed)
    if training:
        dataset = dataset.shuffle(shuffle_buffer(split_info.examples), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(_parser(info), num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if training and augment != "none":
        dataset = dataset.map(_augmenter(augment, seed), num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    # Images stay uint8: the model converts them to float (model.NonEmptyBatch), on the accelerator
    # when there is one, so the host builds and ships batches 4x smaller (benchmarks/README.md, 4.).
    return _batched(dataset, split_info.examples, global_batch_size, training)


def feature_dataset(
    features: np.ndarray,
    labels: np.ndarray,
    global_batch_size: int,
    *,
    training: bool = False,
    seed: int | None = None,
) -> tf.data.Dataset:
    """Batches of cached backbone features, shuffled like `image_dataset` shuffles examples."""
    dataset = tf.data.Dataset.from_tensor_slices((features, labels.astype(np.float32)))
    if training:
        dataset = dataset.shuffle(shuffle_buffer(len(features)), seed=seed, reshuffle_each_iteration=True)
    return _batched(dataset, len(features), global_batch_size, training)


def _batched(dataset: tf.data.Dataset, examples: int, global_batch_size: int, training: bool) -> tf.data.Dataset:
    """Global batches with a known count; training drops the short last batch.

    Under MirroredStrategy a short batch may be split unevenly (even [n, 0]), and Keras averages
    the loss per replica before summing replicas, so a short batch would get a wrong gradient
    weight that depends on how tf.data happened to split it. Reshuffling changes which examples
    are dropped each epoch. Evaluation keeps every example (its metrics weigh by example count).
    The count from dataset.json also makes a shard that disagrees with it fail loudly.
    """
    drop = training and examples >= global_batch_size
    batches = examples // global_batch_size if drop else -(-examples // global_batch_size)
    dataset = dataset.batch(global_batch_size, drop_remainder=drop)
    return dataset.apply(tf.data.experimental.assert_cardinality(batches)).prefetch(tf.data.AUTOTUNE)


def sample_images(info: DatasetInfo, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` (uint8 images [n,S,S,3], multi-hot [n,K]) of `split` in stored order, for reports."""
    images, labels = [], []
    for image, label in image_dataset(info, split, count).take(1):
        images.append(image.numpy())
        labels.append(label.numpy())
    if not images:
        return np.zeros((0, info.image_size, info.image_size, 3), np.uint8), np.zeros((0, info.num_labels), np.float32)
    return images[0], labels[0]
