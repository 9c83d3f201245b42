"""Incremental preprocessing: take an earlier dataset's stored image for every row whose source is
unchanged, instead of fetching, decoding and re-encoding it.

A row is taken from the earlier dataset (`--reuse_dataset`) when
- that dataset's images were made and accepted the way this run would (the same `fingerprint`:
  image options, decoding and download bounds, address and file permissions, code and library
  versions), and
- it holds an example with the row's id whose source (sources-*.jsonl) had the same resolved URI, and
- with `--revalidate conditional`, a conditional request says the source did not change since
  (HTTP If-None-Match / If-Modified-Since -> 304; the same gs:// generation; the same local size and
  mtime). A changed source (HTTP 200 ...) is used as fetched, so it costs one download, as before.
Labels always come from the new manifest (relabels apply); the split is a hash of the id, so it is
the one a full rebuild gives. Rows gone from the manifest are gone from the dataset. The reused
example is rebuilt from the stored image with the row's new labels by the same `dataset.to_example`, so the
shards are the bytes a full rebuild writes (tests/test_reuse.py checks it).

Beam: rows decided as reused leave `EncodeRows` as small `Reused` records (no image); the earlier
dataset's shards are streamed once (`ReusedExamples`) and every example whose id was decided reused
is rebuilt there and joins the fetched ones on their way to the shard writer. Only ids and sources
are side inputs; no image bytes cross a shuffle.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import apache_beam as beam

from pipelines import images
from pipelines.fetch import FetchOptions
from pipelines.manifests import Row
from pipelines.options import ACCEPTANCE
from pipelines.outcomes import REJECTED_TAG, SOURCES_TAG, TALLIES_TAG, count, reject_row, rejected
from pipelines.shards import Encoded, ShardPlan, shard_key
from tagbeam import dataset, flags, storage
from tagbeam.dataset import Source
from tagbeam.flags import UsageError, group, option

_LOG = logging.getLogger(__name__)
REVALIDATE_POLICIES = ("none", "conditional")


@group
class ReuseOptions:
    """Reuse: an earlier dataset's images for rows whose source is unchanged."""

    reuse_dataset: str | None = option(None, help="an earlier dataset folder (this pipeline's output): a row with the "
                                                  "same id and image URI takes its stored image instead of fetching "
                                                  "it (pipelines.retrain passes its newest dataset)")
    revalidate: str = option("none", choices=REVALIDATE_POLICIES,
                             help="none: the same id and URI is unchanged; conditional: ask the source first "
                                  "(HTTP ETag/Last-Modified -> 304, gs:// generation, local size and mtime) and "
                                  "fetch only what changed")


class Reused(NamedTuple):
    """A row whose stored image comes from the earlier dataset: everything but the image."""

    split: str
    id: str
    label_ids: tuple[int, ...]
    source: Source  # as recorded before, with the validators of a revalidation if there was one
    revalidated: bool
    row: Row  # for its dead-letter record, should the earlier dataset have lost the example


@dataclasses.dataclass(frozen=True)
class Previous:
    """The earlier dataset a run reuses: where it is, and its shard files and sources files."""

    data_dir: str
    shard_files: tuple[str, ...]
    source_files: tuple[str, ...]
    compression: str


def fingerprint(image_options: images.ImageOptions, fetch_options: FetchOptions) -> str:
    """dataset.json's image_fingerprint: what makes a stored image from a source (pipelines.images.identity)
    and what decides whether a source is accepted (the fetch options tagged ACCEPTANCE: a run with other
    values might reject, or admit, an image the earlier run admitted, or rejected). A run reuses only a
    dataset whose fingerprint is its own."""
    what = {"image": images.identity(image_options),
            "fetch": {name: getattr(fetch_options, name) for name in flags.tagged(FetchOptions, ACCEPTANCE)}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def previous_dataset(options: ReuseOptions, output: str, image_options: images.ImageOptions,
                     fetch_options: FetchOptions) -> Previous | None:
    """The dataset of --reuse_dataset if this run can reuse it, else None (with a log line saying why:
    reuse is an optimisation, so a dataset made differently only means a full rebuild). Raises
    UsageError for a folder that is not a complete dataset, or that is --output itself."""
    folder = options.reuse_dataset
    if not folder:
        return None
    if _same_place(folder, output):
        raise UsageError(f"--reuse_dataset {folder} is --output: the run clears its output before it reads; "
                         "write the new dataset to another folder")
    try:
        info = dataset.read(folder)
    except dataset.DatasetError as err:
        raise UsageError(f"--reuse_dataset {folder}: {err}") from None
    mine = fingerprint(image_options, fetch_options)
    if info.image_fingerprint != mine:
        _LOG.warning("not reusing %s: its images were made or accepted differently (image fingerprint %r, this "
                     "run's %r: image options, decoding or download bounds, or image library versions differ); "
                     "fetching every image",
                     folder, info.image_fingerprint, mine)
        return None
    sources = tuple(storage.match(dataset.sources_file_pattern(folder)))
    if not sources:
        _LOG.warning("not reusing %s: it has no sources-*.jsonl (written by an older version); fetching every image",
                     folder)
        return None
    shards = tuple(path for split in dataset.SPLITS for path in info.shard_paths(split))
    return Previous(folder, shards, sources, info.shard_compression)


def _same_place(a: str, b: str) -> bool:
    if storage.is_remote(a) or storage.is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _keyed(line: str) -> tuple[str, Source]:
    source = Source.from_json(line)
    return source.id, source


class ReadSources(beam.PTransform):
    """(id, Source) of every example of the earlier dataset; nothing without one."""

    def __init__(self, previous: Previous | None) -> None:
        super().__init__()
        self._previous = previous

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        files = list(self._previous.source_files) if self._previous else []
        return (pbegin
                | "Files" >> beam.Create(files)
                | "Read" >> beam.io.ReadAllFromText()
                | "Parse" >> beam.Map(_keyed))


def _rebuild(record: bytes, reused: Mapping[str, Reused], plan: ShardPlan) -> Iterator[Any]:
    """An example of the earlier dataset -> the same example with the row's new labels, keyed for its
    shard, if its id was decided reused; nothing otherwise (a changed, relabelled-away or removed row)."""
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example.FromString(record)
    features = example.features.feature
    id_ = features[dataset.FEATURE_ID].bytes_list.value[0].decode("utf-8")
    row = reused.get(id_)
    if row is None:
        return
    image = features[dataset.FEATURE_IMAGE].bytes_list.value[0]
    count("images_reused")
    yield beam.pvalue.TaggedOutput(SOURCES_TAG, row.source)
    yield shard_key(Encoded(row.split, id_, dataset.to_example(id_, image, row.label_ids, len(plan.labels)), row.label_ids),
                    plan.num_shards)


def _unmatched(item: tuple[str, dict[str, list]]) -> Iterator[Any]:
    _, found = item
    for reused in found["reused"]:
        if not found["rebuilt"]:
            # EncodeRows counted it as reused; it is not an example after all.
            yield beam.pvalue.TaggedOutput(TALLIES_TAG, (0, -1, -int(reused.revalidated)))
            yield rejected(reject_row(reused.row, "fetch", "reuse_missing",
                                      "the earlier dataset (--reuse_dataset) no longer holds this row's example "
                                      "(changed while the run read it?); rerun, or pass --full_rebuild"))


class ReusedExamples(beam.PTransform):
    """Streams the earlier dataset's shards once and rebuilds each example decided reused, keyed for
    `WriteShards`, with its Source for sources-*.jsonl; a reused row whose example the shards do not hold (a dataset changed
    or pruned while the run read it) becomes a dead-letter record on `rejected` instead of a row lost.
    Input: the `Reused` records; side input: the ShardPlan. Only ids cross the check's shuffle.
    Returns (keyed examples, sources, dead-letter records, tally corrections)."""

    def __init__(self, previous: Previous | None, plan: beam.PCollection) -> None:
        super().__init__()
        self._previous = previous
        self._plan = plan

    def expand(self, reused: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        from apache_beam.io.filesystem import CompressionTypes

        files = list(self._previous.shard_files) if self._previous else []
        compression = CompressionTypes.GZIP if self._previous and self._previous.compression == "gzip" \
            else CompressionTypes.UNCOMPRESSED
        by_id = reused | "ById" >> beam.Map(lambda r: (r.id, r))
        rebuilt = (reused.pipeline
                   | "ShardFiles" >> beam.Create(files)
                   | "ReadShards" >> beam.io.ReadAllFromTFRecord(compression_type=compression)
                   | "Rebuild" >> beam.FlatMap(_rebuild, beam.pvalue.AsDict(by_id), beam.pvalue.AsSingleton(self._plan)
                                                ).with_outputs(SOURCES_TAG, main="examples"))
        lost = ({"reused": by_id,
                 "rebuilt": rebuilt.examples | "RebuiltIds" >> beam.Map(lambda keyed: (keyed[1][0], None))}
                | "Match" >> beam.CoGroupByKey()
                | "Unmatched" >> beam.FlatMap(_unmatched).with_outputs(REJECTED_TAG, TALLIES_TAG, main="none"))
        return rebuilt.examples, rebuilt[SOURCES_TAG], lost[REJECTED_TAG], lost[TALLIES_TAG]
