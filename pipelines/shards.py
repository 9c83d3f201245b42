"""Writes examples into TFRecord shards (uncompressed, or GZIP) whose count follows the data size.

The shard count of a split is planned before any image is fetched (see `plan_shard_counts`):
`ceil(rows in the split x bytes per row / target)`, at least 1, where bytes per row is the mean
serialized example size over a fixed sample of the rows (those with the smallest `sample_key`;
0 for a sampled row that ends up rejected), encoded first. Each example then goes to the shard
given by a hash of its id, and each shard is written sorted by id to a temporary name, then
renamed into place. Shard contents are therefore a function of the data alone (reruns and
retries write the same records), and a reader never sees a half-written shard under its final
name. Examples reach their shard through sorted run files merged by id (`WriteShards`), not a
shuffle, so memory does not grow with the number of images on any runner.

Files are written with Beam's FileSystems (local, gs:// and GCS emulators alike; tf.io cannot
reach an emulator), framing TFRecords here: length (uint64 LE), masked CRC32C of the length,
data, masked CRC32C of the data.

Shards are uncompressed by default, like tensorflow-datasets': the images in them are JPEG or PNG,
already compressed, so GZIP saved 1 % on real chips (up to ~25 % on flat synthetic posters) and
cost every training read ~0.1 CPU-ms per example to inflate (benchmarks/README.md).
"""
from __future__ import annotations

import heapq
import math
import struct
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import google_crc32c
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

from pipelines.outcomes import count
from pipelines.splits import unit_hash
from tagbeam import storage
from tagbeam.dataset import SHARD_COMPRESSIONS, Source, shard_name

_SHARD_SALT = b"tagbeam-shard:"
_SAMPLE_SALT = b"tagbeam-sample:"
# Rows encoded first to estimate the bytes per example: enough for a mean within ~10 % on
# photos and posters, few enough to be one small step.
SAMPLE_ROWS = 32
# A bundle writes its buffered examples as runs when they pass this many bytes: the bound on
# the memory sharding takes per worker thread, whatever the data size.
RUN_BUFFER_BYTES = 32 * 2**20
# Runs merged at once (open files); a shard fed by more bundles is merged in several passes.
MAX_FAN_IN = 128
# Runs live in <output>/runs.tmp-<uuid>/, which the clean-up of temporaries matches (storage.TEMP_MARK).
RUNS_DIR_PREFIX = f"runs{storage.TEMP_MARK}"
_RUN_HEADER = struct.Struct("<IQ")  # id length, record length
_BEAM_COMPRESSION = {"none": CompressionTypes.UNCOMPRESSED, "gzip": CompressionTypes.GZIP}


class Encoded(NamedTuple):
    split: str
    id: str
    record: bytes  # a serialized tf.train.Example
    label_ids: tuple[int, ...]  # indices of the row's labels, for label counts
    source: Source | None = None  # where its image came from (sources-*.jsonl)


ShardKey = tuple[str, int, int]  # split, shard index, shards in the split


class Run(NamedTuple):
    """A run file: some of one shard's examples, sorted by id (see `WriteShards`)."""

    path: str
    examples: int
    label_counts: dict[int, int]  # label index -> examples with it


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


def write_tfrecord(path: str, records: Iterable[bytes], compression: str = "none") -> int:
    """Writes `records` to `path` through a temporary file renamed into place; returns the file size."""
    tmp = storage.temp_name(path)
    with FileSystems.create(tmp, compression_type=_BEAM_COMPRESSION[compression]) as out:
        for record in records:
            out.write(tfrecord_frame(record))
    # A retried bundle may have written it before; the content is the same.
    return _size(storage.move_into_place(tmp, path))


def _size(path: str) -> int:
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def write_run(path: str, examples: Iterable[tuple[str, bytes]]) -> None:
    """A run: (id, record) pairs, already sorted by id, each as `_RUN_HEADER` lengths, id, record."""
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as out:
        for id_, record in examples:
            key = id_.encode("utf-8")
            out.write(b"".join((_RUN_HEADER.pack(len(key), len(record)), key, record)))


def _read_exactly(handle: Any, n: int, path: str) -> bytes:
    data = handle.read(n)
    while len(data) < n:  # some file systems return short reads before the end
        more = handle.read(n - len(data))
        if not more:
            raise OSError(f"run file {path} is truncated; rerun the pipeline")
        data += more
    return data


def read_run(path: str) -> Iterator[tuple[str, bytes]]:
    """Streams the (id, record) pairs of a run written by `write_run`."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        while header := handle.read(_RUN_HEADER.size):
            if len(header) < _RUN_HEADER.size:
                header += _read_exactly(handle, _RUN_HEADER.size - len(header), path)
            key_len, record_len = _RUN_HEADER.unpack(header)
            body = _read_exactly(handle, key_len + record_len, path)
            yield body[:key_len].decode("utf-8"), body[key_len:]


def merge_runs(paths: Sequence[str], run_dir: str, fan_in: int = MAX_FAN_IN) -> Iterator[tuple[str, bytes]]:
    """The (id, record) pairs of sorted runs, merged by id, reading each run as a stream. More than
    `fan_in` runs are first merged in groups into intermediate runs (deleted once read), so that
    open files stay bounded however many bundles fed one shard."""
    paths = list(paths)
    intermediate: set[str] = set()
    while len(paths) > fan_in:
        merged = []
        for i in range(0, len(paths), fan_in):
            group = paths[i:i + fan_in]
            target = f"{run_dir.rstrip('/')}/merged-{uuid.uuid4().hex}.run"
            write_run(target, heapq.merge(*map(read_run, group), key=_by_id))
            merged.append(target)
            _delete([p for p in group if p in intermediate])
        intermediate.update(merged)
        paths = merged
    yield from heapq.merge(*map(read_run, paths), key=_by_id)
    _delete([p for p in paths if p in intermediate])


def _by_id(example: tuple[str, bytes]) -> str:
    return example[0]


def _delete(paths: Sequence[str]) -> None:
    if paths:
        FileSystems.delete(list(paths))


class _WriteRuns(beam.DoFn):
    """(ShardKey, (id, record, label ids)) -> (ShardKey, Run): buffers a bundle's examples per
    shard and writes each buffer, sorted by id, as a run file in `run_dir` when the bundle ends or
    the buffers pass `buffer_bytes`. Only this small metadata crosses the shuffle, so no runner
    holds image bytes for a group-by (the local runner keeps a group-by's whole input in memory)."""

    def __init__(self, run_dir: str, buffer_bytes: int = RUN_BUFFER_BYTES) -> None:
        self._run_dir = run_dir.rstrip("/")
        self._buffer_bytes = buffer_bytes

    def start_bundle(self) -> None:
        self._buffers: dict[ShardKey, list[tuple[str, bytes, tuple[int, ...]]]] = defaultdict(list)
        self._buffered = 0

    def process(self, item: tuple[ShardKey, tuple[str, bytes, tuple[int, ...]]]) -> Iterator[tuple[ShardKey, Run]]:
        key, example = item
        self._buffers[key].append(example)
        self._buffered += len(example[0]) + len(example[1])
        if self._buffered >= self._buffer_bytes:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for key_and_run in self._flush():
            yield GlobalWindows.windowed_value(key_and_run)

    def _flush(self) -> Iterator[tuple[ShardKey, Run]]:
        for (split, index, num_shards), examples in self._buffers.items():
            examples.sort(key=lambda e: e[0])
            path = f"{self._run_dir}/{split}-{index:05d}-{uuid.uuid4().hex}.run"
            write_run(path, ((id_, record) for id_, record, _ in examples))
            label_counts: dict[int, int] = defaultdict(int)
            for _, _, label_ids in examples:
                for label in label_ids:
                    label_counts[label] += 1
            yield (split, index, num_shards), Run(path, len(examples), dict(label_counts))
        self._buffers.clear()
        self._buffered = 0


class _MergeShard(beam.DoFn):
    """(ShardKey, runs or None placeholders) -> the shard file, merged from its runs by id, and its
    stats. The runs are deleted once the shard is in place; a retry that finds the shard in place
    (renamed only when complete, before its runs went) reports it as is."""

    def __init__(self, output_dir: str, run_dir: str, compression: str) -> None:
        self._output_dir = output_dir.rstrip("/")
        self._run_dir = run_dir.rstrip("/")
        self._compression = compression

    def process(self, item: tuple[ShardKey, Iterable[Run | None]], plan: ShardPlan) -> Iterator[dict[str, Any]]:
        (split, index, num_shards), values = item
        runs = [v for v in values if v is not None]
        label_counts = [0] * len(plan.labels)
        for run in runs:
            for label, n in run.label_counts.items():
                label_counts[label] += n
        examples = sum(run.examples for run in runs)
        name = shard_name(split, index, num_shards, self._compression)
        path = f"{self._output_dir}/{name}"
        if FileSystems.exists(path):
            size = _size(path)
        else:
            paths = [run.path for run in runs]
            size = write_tfrecord(path, (record for _, record in merge_runs(paths, self._run_dir)), self._compression)
            _delete(paths)
        count(f"examples_written_{split}", examples)
        count("bytes_written", size)
        count(f"shards_written_{split}")
        yield {"split": split, "index": index, "num_shards": num_shards, "file": name,
               "examples": examples, "bytes": size, "label_counts": label_counts}


class WriteShards(beam.PTransform):
    """(ShardKey, (id, record, label ids)) pairs -> shard files in `output_dir`; returns one stats
    dict per shard written.

    Examples never cross a shuffle: each bundle writes sorted runs into `output_dir`/runs.tmp-<uuid>/
    (a folder every worker can reach: gs:// on Dataflow), only run metadata is grouped by shard,
    and each shard is a streaming k-way merge of its runs. Memory is bounded by a bundle's buffer
    and a merge's read buffers, not by the data. Runs of failed bundles that no metadata names
    stay in the folder; `pipelines.dataset_info.remove_temporaries` removes it after the run.
    `output_dir` must hold no shard of another run (`dataset_info.prepare_output` sees to it): a
    shard already in place counts as written by an earlier attempt of this one.

    `plan` (a singleton ShardPlan) names every shard to write: each one is written, even one that
    no example hashed to (an empty file), so `-of-N` names always come in complete sets; splits
    missing from it get no shard.
    """

    def __init__(self, output_dir: str, plan: beam.PCollection, compression: str = "none",
                 buffer_bytes: int = RUN_BUFFER_BYTES) -> None:
        super().__init__()
        if compression not in SHARD_COMPRESSIONS:
            raise ValueError(f"shard compression {compression!r} is not one of {SHARD_COMPRESSIONS}")
        self._output_dir = output_dir
        self._plan = plan
        self._compression = compression
        self._buffer_bytes = buffer_bytes
        self._run_dir = f"{output_dir.rstrip('/')}/{RUNS_DIR_PREFIX}{uuid.uuid4().hex}"

    def expand(self, keyed: beam.PCollection) -> beam.PCollection:
        runs = keyed | "WriteRuns" >> beam.ParDo(_WriteRuns(self._run_dir, self._buffer_bytes))
        placeholders = self._plan | "EveryShard" >> beam.FlatMap(
            lambda plan: [((split, i, n), None) for split, n in plan.num_shards.items() for i in range(n)])
        return ((runs, placeholders)
                | "WithEmptyShards" >> beam.Flatten()
                | "GroupByShard" >> beam.GroupByKey()
                | "MergeShard" >> beam.ParDo(_MergeShard(self._output_dir, self._run_dir, self._compression),
                                             beam.pvalue.AsSingleton(self._plan)))
