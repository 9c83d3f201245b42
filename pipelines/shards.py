"""Writes examples into GZIP TFRecord shards whose count follows the data size.

The shard count of a split is planned before any image is fetched (see `plan_shard_counts`):
`ceil(rows in the split x bytes per row / target)`, at least 1, where bytes per row is the mean
serialized example size over a fixed sample of the rows (those with the smallest `sample_key`;
0 for a sampled row that ends up rejected), encoded first. Each example then goes to the shard given by a hash of its id, and each shard is
written sorted by id to a temporary name, then renamed into place. Shard contents are therefore
a function of the data alone (reruns and retries write the same records), a reader never sees a
half-written shard under its final name, and no step has to hold every encoded example to learn
the split sizes (the runner streams examples into the group-by-shard).

Files are written with Beam's FileSystems (local, gs:// and GCS emulators alike; tf.io cannot
reach an emulator), framing TFRecords here: length (uint64 LE), masked CRC32C of the length,
data, masked CRC32C of the data.
"""
from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import google_crc32c
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.manifests import count
from pipelines.splits import unit_hash

_SHARD_SALT = b"tagbeam-shard:"
_SAMPLE_SALT = b"tagbeam-sample:"
# Rows encoded first to estimate the bytes per example: enough for a mean within ~10 % on
# photos and posters, few enough to be one small step.
SAMPLE_ROWS = 32


class Encoded(NamedTuple):
    split: str
    id: str
    record: bytes  # a serialized tf.train.Example
    label_ids: tuple[int, ...]  # indices of the row's labels, for label counts


ShardKey = tuple[str, int, int]  # split, shard index, shards in the split


class ShardPlan(NamedTuple):
    """What encoding and sharding need, decided before the first image is fetched."""

    labels: list[str]  # the vocabulary; empty when the run cannot go on (no usable row or label)
    num_shards: dict[str, int]  # splits with rows -> shard count
    sample: dict[str, Any]  # id -> Encoded or dead-letter record of the rows encoded to plan


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return b"".join((length, struct.pack("<I", masked_crc32c(length)), data, struct.pack("<I", masked_crc32c(data))))


def shard_count(total_bytes: float, target_bytes: int) -> int:
    return max(1, math.ceil(total_bytes / target_bytes))


def shard_of(id_: str, num_shards: int) -> int:
    return min(num_shards - 1, int(unit_hash(id_, _SHARD_SALT) * num_shards))


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord.gz"


def sample_key(id_: str) -> float:
    """Rows with the smallest keys form the size sample (a function of the ids alone)."""
    return unit_hash(id_, _SAMPLE_SALT)


def plan_shard_counts(rows_per_split: Mapping[str, int], sample_bytes: Sequence[int], target_bytes: int
                      ) -> dict[str, int]:
    """Shards per split with rows: rows x the mean serialized size over the sampled rows (0 for a
    sampled row that was rejected, so rejections shrink the estimate too), over the target."""
    per_row = sum(sample_bytes) / len(sample_bytes) if sample_bytes else 0
    return {split: shard_count(rows * per_row, target_bytes) for split, rows in rows_per_split.items() if rows}


def shard_key(e: Encoded, num_shards: Mapping[str, int]) -> tuple[ShardKey, tuple[str, bytes, tuple[int, ...]]]:
    n = num_shards[e.split]
    return (e.split, shard_of(e.id, n), n), (e.id, e.record, e.label_ids)


def write_tfrecord_gz(path: str, records: Iterable[bytes]) -> int:
    """Writes `records` to `path` through a temporary file renamed into place; returns the file size."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(tmp, compression_type=CompressionTypes.GZIP) as out:
        for record in records:
            out.write(tfrecord_frame(record))
    if FileSystems.exists(path):  # a retried bundle wrote it before; the content is the same
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


class _WriteShard(beam.DoFn):
    def __init__(self, output_dir: str) -> None:
        self._output_dir = output_dir.rstrip("/")

    def process(self, item: tuple[ShardKey, Iterable[Any]], plan: ShardPlan) -> Iterator[dict[str, Any]]:
        (split, index, num_shards), values = item
        examples = sorted((v for v in values if v is not None), key=lambda v: v[0])
        label_counts = [0] * len(plan.labels)
        for _, _, label_ids in examples:
            for label in label_ids:
                label_counts[label] += 1
        name = shard_name(split, index, num_shards)
        size = write_tfrecord_gz(f"{self._output_dir}/{name}", (record for _, record, _ in examples))
        beam.metrics.Metrics.counter("tagbeam", f"examples_written_{split}").inc(len(examples))
        beam.metrics.Metrics.counter("tagbeam", "bytes_written").inc(size)
        count(f"shards_written_{split}")
        yield {"split": split, "index": index, "num_shards": num_shards, "file": name,
               "examples": len(examples), "bytes": size, "label_counts": label_counts}


class WriteShards(beam.PTransform):
    """(ShardKey, (id, record, label ids)) pairs -> shard files in `output_dir`; returns one stats
    dict per shard written.

    `plan` (a singleton ShardPlan) names every shard to write: each one is written, even one that
    no example hashed to (an empty file), so `-of-N` names always come in complete sets; splits
    missing from it get no shard.
    """

    def __init__(self, output_dir: str, plan: beam.PCollection) -> None:
        super().__init__()
        self._output_dir = output_dir
        self._plan = plan

    def expand(self, keyed: beam.PCollection) -> beam.PCollection:
        placeholders = self._plan | "EveryShard" >> beam.FlatMap(
            lambda plan: [((split, i, n), None) for split, n in plan.num_shards.items() for i in range(n)])
        return ((keyed, placeholders)
                | "WithEmptyShards" >> beam.Flatten()
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteShard" >> beam.ParDo(_WriteShard(self._output_dir), beam.pvalue.AsSingleton(self._plan)))
