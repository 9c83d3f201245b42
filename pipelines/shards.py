"""Writes examples into GZIP TFRecord shards whose count follows the data size.

Like tensorflow-datasets' Beam writer: per split the total serialized size decides the number of
shards (`ceil(bytes / target)`, at least 1), each example goes to the shard given by a hash of its
id, and each shard is written sorted by id to a temporary name, then renamed into place. Shard
contents are therefore a function of the data alone (reruns and retries write the same records),
and a reader never sees a half-written shard under its final name.

Files are written with Beam's FileSystems (local, gs:// and GCS emulators alike; tf.io cannot
reach an emulator), framing TFRecords here: length (uint64 LE), masked CRC32C of the length,
data, masked CRC32C of the data.
"""
from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import google_crc32c
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.manifests import count
from pipelines.splits import SPLITS, unit_hash

_SHARD_SALT = b"tagbeam-shard:"


class Encoded(NamedTuple):
    split: str
    id: str
    record: bytes  # a serialized tf.train.Example
    label_ids: tuple[int, ...]  # indices of the row's labels, for label counts


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return b"".join((length, struct.pack("<I", masked_crc32c(length)), data, struct.pack("<I", masked_crc32c(data))))


def shard_count(total_bytes: int, target_bytes: int) -> int:
    return max(1, math.ceil(total_bytes / target_bytes))


def shard_of(id_: str, num_shards: int) -> int:
    return min(num_shards - 1, int(unit_hash(id_, _SHARD_SALT) * num_shards))


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord.gz"


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
    def __init__(self, output_dir: str, num_labels: int, target_bytes: int) -> None:
        self._output_dir = output_dir.rstrip("/")
        self._num_labels = num_labels
        self._target_bytes = target_bytes

    def process(self, item: tuple[tuple[str, int], Iterable[Any]], sizes: dict[str, tuple[int, int]]
                ) -> Iterator[dict[str, Any]]:
        (split, index), values = item
        num_shards = shard_count(sizes[split][0], self._target_bytes)
        examples = sorted((v for v in values if v is not None), key=lambda v: v[0])
        label_counts = [0] * self._num_labels
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
    """Encoded examples -> shard files in `output_dir`; returns one stats dict per shard written.

    Splits without examples get no shard. Every shard index of a split is written, even one that
    no id hashed to (an empty file), so `-of-N` names always come in complete sets.
    """

    def __init__(self, output_dir: str, num_labels: int, target_bytes: int) -> None:
        super().__init__()
        self._output_dir = output_dir
        self._num_labels = num_labels
        self._target_bytes = target_bytes

    def expand(self, encoded: beam.PCollection) -> beam.PCollection:
        target = self._target_bytes
        sizes = beam.pvalue.AsDict(
            encoded
            | "SizeBySplit" >> beam.Map(lambda e: (e.split, (len(e.record), 1)))
            | "SumSizes" >> beam.CombinePerKey(lambda pairs: tuple(map(sum, zip(*pairs))) or (0, 0)))

        def assign(e: Encoded, sizes: dict) -> tuple[tuple[str, int], tuple]:
            shard = shard_of(e.id, shard_count(sizes[e.split][0], target))
            return (e.split, shard), (e.id, e.record, e.label_ids)

        def every_shard(split: str, sizes: dict) -> list[tuple[tuple[str, int], None]]:
            if split not in sizes:
                return []
            return [((split, i), None) for i in range(shard_count(sizes[split][0], target))]

        keyed = encoded | "AssignShard" >> beam.Map(assign, sizes)
        placeholders = (encoded.pipeline
                        | "Splits" >> beam.Create(SPLITS)
                        | "EveryShard" >> beam.FlatMap(every_shard, sizes))
        return ((keyed, placeholders)
                | "WithEmptyShards" >> beam.Flatten()
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteShard" >> beam.ParDo(_WriteShard(self._output_dir, self._num_labels, target), sizes))
