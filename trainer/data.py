"""Reads a dataset directory (docs/dataset.md) into tf.data pipelines.

Labels, their order, the image size and format all come from the directory itself
(`dataset.json` and `labels.txt`); paths may be local or gs:// (everything goes through
tf.io.gfile and tf.data).
"""
from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from tagbeam.dataset import FEATURE_ID, FEATURE_IMAGE, FEATURE_LABELS, DatasetError, DatasetInfo
from trainer.config import AUGMENTATIONS

log = logging.getLogger(__name__)

# Bounded so a large split's shuffle buffer of encoded examples stays well under a few GB;
# shard-order shuffling adds mixing beyond it.
MAX_SHUFFLE_BUFFER = 10_000
# Shards read at once: enough parallel GCS streams to keep a GPU fed (a plain sequential read
# of GCS shards is the classic input bottleneck), few enough to bound memory.
MAX_CYCLE_LENGTH = 16


def shuffle_buffer(examples: int) -> int:
    """The example shuffle buffer for a split of `examples`; the cached-feature path uses the same."""
    return max(1, min(examples, MAX_SHUFFLE_BUFFER))


def _records(paths: tuple[str, ...], compression_type: str, training: bool, seed: int | None) -> tf.data.Dataset:
    """Serialized examples of a split's shards: a deterministic order unless training without a seed."""
    files = tf.data.Dataset.list_files(list(paths), shuffle=training, seed=seed)
    deterministic = seed is not None or not training
    return files.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type=compression_type),
        cycle_length=max(1, min(len(paths), MAX_CYCLE_LENGTH)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )


def _parser(info: DatasetInfo):
    spec = {
        FEATURE_ID: tf.io.FixedLenFeature([], tf.string),
        FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string),
        FEATURE_LABELS: tf.io.FixedLenFeature([info.num_labels], tf.int64),
    }
    stored = info.stored_images

    def parse(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        example = tf.io.parse_single_example(serialized, spec)
        return stored.decode(example[FEATURE_IMAGE]), tf.cast(example[FEATURE_LABELS], tf.float32)

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


def split_records(info: DatasetInfo, split: str) -> tf.data.Dataset:
    """The serialized examples of `split` in the stored order (the order of evaluation)."""
    return _records(info.shard_paths(split), info.compression_type, False, None)


def image_dataset(
    info: DatasetInfo,
    split: str,
    global_batch_size: int,
    *,
    training: bool = False,
    seed: int | None = None,
    augment: str = "none",
    only: np.ndarray | None = None,
) -> tf.data.Dataset:
    """(uint8 images [B,S,S,3], the pixels as stored; float32 multi-hot [B,K]) batches of `split`.

    Training shuffles shard order and examples (reproducibly when `seed` is set), applies
    `augment` and drops a short last batch; evaluation reads every example with shards in their
    stored order. Batches hold the GLOBAL batch size: under MirroredStrategy Keras splits each
    across the replicas. `only` (evaluation order only): a bool mask, one per example in stored
    order, of the examples to read (trainer/features.py extracts just the images it lacks).
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    split_info, paths = info.split(split), info.shard_paths(split)
    if not paths:
        raise DatasetError(f"the {split} split of {info.data_dir} has no shards")
    deterministic = seed is not None or not training
    dataset = _records(paths, info.compression_type, training, seed)
    examples = split_info.examples
    if only is not None:
        if training or len(only) != examples:
            raise ValueError(f"only: a mask over the {examples} examples of {split}, in evaluation order")
        mask = tf.constant(only, tf.bool)
        dataset = dataset.enumerate().filter(lambda i, _: mask[i]).map(lambda _, record: record)
        examples = int(only.sum())
    if training:
        dataset = dataset.shuffle(shuffle_buffer(split_info.examples), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(_parser(info), num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if training and augment != "none":
        dataset = dataset.map(_augmenter(augment, seed), num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    # Images stay uint8: the model converts them to float (model.NonEmptyBatch), on the accelerator
    # when there is one, so the host builds and ships batches 4x smaller (benchmarks/README.md, 4.).
    return _batched(dataset, examples, global_batch_size, training)


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


def corrupt_dataset_error(info: DatasetInfo, err: Exception) -> DatasetError:
    """What to tell the user when reading shards failed with a DataLossError: which shards are
    corrupt (each is read again, alone, to find out) and what to do."""
    corrupt = []
    for split in ("train", "val", "test"):
        for path in info.shard_paths(split):
            try:
                for _ in tf.data.TFRecordDataset(path, compression_type=info.compression_type):
                    pass
            except (tf.errors.DataLossError, tf.errors.InvalidArgumentError):
                corrupt.append(path)
    named = ", ".join(corrupt[:5]) + (", ..." if len(corrupt) > 5 else "") if corrupt else "no single shard"
    return DatasetError(f"--data_dir {info.data_dir}: corrupt shard(s) ({named}): {str(err).splitlines()[0][:200]}; "
                        "the files changed after the pipeline wrote them: rerun `python -m pipelines.preprocess`")
