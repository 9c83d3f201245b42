"""Per-row stages of the main pass: labels -> multi-hot ids, fetch + decode + resize, tf.train.Example.

Every outcome is a named counter in the "tagbeam" namespace, and every failure a dead-letter record
on the `rejected` output, so one bad row costs that row only.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam

from pipelines import fetch, images
from pipelines.manifests import REJECTED_TAG, Row, count, reject_row
from pipelines.shards import Encoded
from pipelines.splits import split_of

_LOG = logging.getLogger(__name__)


class EncodeLabels(beam.DoFn):
    """Row -> (Row, sorted label ids). Labels outside the vocabulary are ignored (and counted);
    a row left without any known label is rejected (`labels`/`no_known_label`) or kept all-zero."""

    def __init__(self, labels: Sequence[str], keep_unlabeled: bool) -> None:
        self._index = {label: i for i, label in enumerate(labels)}
        self._keep_unlabeled = keep_unlabeled

    def process(self, row: Row) -> Iterator[Any]:
        ids = sorted({self._index[label] for label in row.labels if label in self._index})
        unknown = sum(1 for label in row.labels if label not in self._index)
        if unknown:
            beam.metrics.Metrics.counter("tagbeam", "labels_ignored").inc(unknown)
        if ids:
            yield row, tuple(ids)
            return
        count("rows_without_known_label")
        if self._keep_unlabeled:
            yield row, ()
            return
        count("rejected_labels_no_known_label")
        known = ", ".join(row.labels) if row.labels else "none"
        yield beam.pvalue.TaggedOutput(REJECTED_TAG, reject_row(
            row, "labels", "no_known_label", f"no label of this row is in the vocabulary (row labels: {known})"))


@dataclasses.dataclass(frozen=True)
class ExampleOptions:
    fetch: fetch.FetchOptions
    image: images.ImageOptions
    fetch_concurrency: int
    val_fraction: float
    test_fraction: float
    num_labels: int


def to_example(id_: str, image: bytes, label_ids: Sequence[int], num_labels: int) -> bytes:
    """The serialized tf.train.Example of docs/dataset.md."""
    from tensorflow.core.example import example_pb2, feature_pb2

    multi_hot = [0] * num_labels
    for label in label_ids:
        multi_hot[label] = 1
    features = feature_pb2.Features(feature={
        "id": feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[id_.encode("utf-8")])),
        "image": feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[image])),
        "labels": feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=multi_hot)),
    })
    return example_pb2.Example(features=features).SerializeToString()


def fetch_rows(rows: Sequence[Row], options: fetch.FetchOptions, concurrency: int) -> list[bytes | fetch.FetchError]:
    """Fetches the rows' images concurrently, in row order, one result (bytes or error) per row."""
    # fetch confines local reads to a row's base folder, so rows are fetched per base.
    by_base: dict[str | None, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_base[row.base].append(i)
    fetched: list[bytes | fetch.FetchError] = [b""] * len(rows)
    for base, indices in by_base.items():
        results = fetch.fetch_many([rows[i].uri for i in indices], options, max_workers=concurrency, base=base)
        for i, result in zip(indices, results):
            fetched[i] = result
    return fetched


class FetchAndEncode(beam.DoFn):
    """A batch of (Row, label ids) -> Encoded examples; fetch and decode failures -> rejected.

    Batches let `fetch_many` overlap the network latency of many rows on threads inside a
    worker; decoding then runs row by row (CPU-bound, parallel across workers).
    """

    def __init__(self, options: ExampleOptions) -> None:
        self._options = options

    def process(self, batch: Sequence[tuple[Row, tuple[int, ...]]]) -> Iterator[Any]:
        opts = self._options
        fetched = fetch_rows([row for row, _ in batch], opts.fetch, opts.fetch_concurrency)
        for (row, label_ids), data in zip(batch, fetched):
            if isinstance(data, fetch.FetchError):
                count(f"rejected_fetch_{data.reason}")
                yield beam.pvalue.TaggedOutput(REJECTED_TAG, reject_row(row, "fetch", data.reason, data.detail))
                continue
            count("images_fetched")
            beam.metrics.Metrics.counter("tagbeam", "bytes_fetched").inc(len(data))
            try:
                image = images.process(data, opts.image)
            except images.ImageError as err:
                count(f"rejected_decode_{err.reason}")
                yield beam.pvalue.TaggedOutput(REJECTED_TAG, reject_row(row, "decode", err.reason, err.detail))
                continue
            count("images_decoded")
            split = split_of(row.id, opts.val_fraction, opts.test_fraction)
            yield Encoded(split, row.id, to_example(row.id, image, label_ids, opts.num_labels), label_ids)


class LogProgress(beam.DoFn):
    """Passes elements through, logging (INFO) the count and rate every `every_s` seconds per worker."""

    def __init__(self, what: str, every_s: float = 10.0) -> None:
        self._what = what
        self._every_s = every_s

    def setup(self) -> None:
        self._start = self._last = time.monotonic()
        self._seen = 0

    def process(self, element: Any) -> Iterator[Any]:
        self._seen += 1
        now = time.monotonic()
        if now - self._last >= self._every_s:
            self._last = now
            _LOG.info("%d %s so far on this worker (%.1f/s)", self._seen, self._what,
                      self._seen / max(now - self._start, 1e-9))
        yield element
