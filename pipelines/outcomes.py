"""How a row's outcome is reported, in one place: Beam counters (namespace "tagbeam"), the
output tags, and the dead-letter record (tagbeam.dataset.Rejection).

A rejection is counted as `rejected_<stage>_<reason>` where it is made, so the counters and the
dead letter always agree.
"""
from __future__ import annotations

import functools
from typing import Any

import apache_beam as beam

from tagbeam import storage
from tagbeam.dataset import REJECTED_PREFIX, REJECTED_SUFFIX, SHARD_TEMPLATE, SOURCES_PREFIX, SOURCES_SUFFIX, Rejection

COUNTER_NAMESPACE = "tagbeam"
# The tagged outputs of the pipeline's steps, in one place.
REJECTED_TAG = "rejected"  # dead-letter records (every step)
REUSED_TAG = "reused"  # rows whose stored image comes from the earlier dataset (pipelines/examples.py -> reuse.py)
SOURCES_TAG = "sources"  # where each example's Source leaves EncodeRows and the rebuild
TALLIES_TAG = "tallies"  # (rows fetched, reused, revalidated) per batch, summed into dataset.json


@functools.cache
def _counter(name: str) -> Any:
    # Beam counters resolve the current metrics container at inc() time, so one object per name
    # can serve every bundle; creating one per increment was measurable per-image overhead.
    return beam.metrics.Metrics.counter(COUNTER_NAMESPACE, name)


def count(name: str, n: int = 1) -> None:
    _counter(name).inc(n)


def rejection(file: str, row: int, id_: str, uri: str, stage: str, reason: str, detail: str) -> Rejection:
    """A dead-letter record, counted."""
    count(f"rejected_{stage}_{reason}")
    return Rejection(file, row, id_, uri, stage, reason, detail)


def reject_row(row: Any, stage: str, reason: str, detail: str) -> Rejection:
    """The dead-letter record of a manifest Row (pipelines.manifests.Row), counted."""
    return rejection(row.file, row.row, row.id, row.uri, stage, reason, detail)


def rejected(record: Rejection) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(REJECTED_TAG, record)


class WriteSources(beam.PTransform):
    """sources-*.jsonl (tagbeam.dataset.Source per example); yields its file names."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self._output = output

    def expand(self, sources: beam.PCollection) -> beam.PCollection:
        return (sources
                | "ToJson" >> beam.Map(lambda s: s.to_json())
                | "Write" >> beam.io.WriteToText(storage.join(self._output, SOURCES_PREFIX),
                                                 file_name_suffix=SOURCES_SUFFIX, shard_name_template=SHARD_TEMPLATE))


class WriteRejected(beam.PTransform):
    """The dead letter, rejected-*.jsonl, from a tuple of every step's rejections; yields its file names."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self._output = output

    def expand(self, parts: tuple[beam.PCollection, ...]) -> beam.PCollection:
        return (parts
                | "All" >> beam.Flatten()
                | "ToJson" >> beam.Map(lambda r: r.to_json())
                | "Write" >> beam.io.WriteToText(storage.join(self._output, REJECTED_PREFIX),
                                                 file_name_suffix=REJECTED_SUFFIX, shard_name_template=SHARD_TEMPLATE))
