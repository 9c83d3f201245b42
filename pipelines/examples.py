"""Per-row work of the pipeline: labels -> multi-hot ids, fetch + decode + resize, tf.train.Example,
and the shard each example goes to, in one step (`EncodeRows`) so that a row crosses as few Beam
transforms as possible.

Every outcome is a named counter in the "tagbeam" namespace, and every failure a dead-letter record
on the `rejected` output, so one bad row costs that row only.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam

from pipelines import fetch, images
from pipelines.manifests import Row
from pipelines.outcomes import REUSED_TAG, SOURCES_TAG, TALLIES_TAG, count, reject_row, rejected
from pipelines.reuse import Reused
from pipelines.shards import Encoded, ShardPlan, plan_shard_counts, shard_key
from pipelines.splits import split_of
from tagbeam.dataset import Rejection, Source, to_example, unexpected

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExampleOptions:
    """What the per-row work needs, for the workers (a subset of the job's option groups)."""

    fetch: fetch.FetchOptions
    image: images.ImageOptions
    val_fraction: float
    test_fraction: float
    keep_unlabeled: bool  # rows without a known label: kept all-zero, or rejected
    revalidate: str  # pipelines.reuse.ReuseOptions.revalidate: how a reusable row is checked


def fetch_rows(rows: Sequence[Row], options: fetch.FetchOptions,
               known: Sequence[fetch.Validators | None] | None = None) -> list[fetch.Fetched | fetch.FetchError]:
    """Fetches the rows' images concurrently, in row order, one result (Fetched or error) per row;
    conditionally where `known` gives a row the validators of an earlier fetch."""
    # fetch confines local reads to a row's base folder, so rows are fetched per base.
    by_base: dict[str | None, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_base[row.base].append(i)
    fetched: list[fetch.Fetched | fetch.FetchError] = [None] * len(rows)  # type: ignore[list-item]
    for base, indices in by_base.items():
        results = fetch.fetch_many([rows[i].uri for i in indices], options, base=base,
                                   known=[known[i] for i in indices] if known is not None else None)
        for i, result in zip(indices, results, strict=True):
            fetched[i] = result
    return fetched


Result = Encoded | Reused | Rejection


def decoded_or_rejection(row: Row, decode: Callable[[], bytes]) -> bytes | Rejection:
    """`decode()` of a fetched image, or the row's dead-letter record: an ImageError with its own
    reason, anything else (whatever the bytes hold) named by its type - never an error of the job."""
    try:
        return decode()
    except images.ImageError as err:
        return reject_row(row, "decode", err.reason, err.detail)
    except Exception as err:  # noqa: BLE001 - the bytes cost their row only
        return reject_row(row, "decode", *unexpected(err))


def _label_ids(row: Row, index: Mapping[str, int], keep_unlabeled: bool) -> tuple[int, ...] | Rejection:
    """Sorted ids of the row's known labels, or its dead-letter record. Labels outside the
    vocabulary are ignored (and counted); a row left without any known label is rejected
    (`labels`/`no_known_label`) or kept all-zero."""
    ids = tuple(sorted({index[label] for label in row.labels if label in index}))
    unknown = len(row.labels) - sum(1 for label in row.labels if label in index)
    if unknown:
        count("labels_ignored", unknown)
    if ids:
        return ids
    count("rows_without_known_label")
    if keep_unlabeled:
        return ids
    known = ", ".join(row.labels) if row.labels else "none"
    return reject_row(row, "labels", "no_known_label",
                      f"no label of this row is in the vocabulary (row labels: {known})")


def _encode(row: Row, label_ids: tuple[int, ...], fetched: fetch.Fetched | fetch.FetchError, opts: ExampleOptions,
            num_labels: int, previous: Source | None) -> Result:
    split = split_of(row.id, opts.val_fraction, opts.test_fraction)
    if isinstance(fetched, fetch.FetchError):
        return reject_row(row, "fetch", fetched.reason, fetched.detail)
    if fetched.data is None:  # a conditional fetch found the source unchanged
        assert previous is not None
        count("rows_revalidated")
        return Reused(split, row.id, label_ids, previous._replace(validators=fetched.validators), True, row)
    data = fetched.data
    count("images_fetched")
    count("bytes_fetched", len(data))
    image = decoded_or_rejection(row, lambda: images.process(data, opts.image))
    if isinstance(image, Rejection):
        return image
    count("images_decoded")
    return Encoded(split, row.id, to_example(row.id, image, label_ids, num_labels), label_ids,
                   Source(row.id, row.uri, fetched.validators, len(image)))


def encode_rows(rows: Sequence[Row], labels: Sequence[str], opts: ExampleOptions,
                previous: Mapping[str, Source] | None = None) -> list[Result]:
    """One result per row, in order. Rows without a known label are rejected before any fetch; a row
    whose id and URI `previous` (the sources of a dataset being reused) knows is Reused, after a
    conditional fetch if opts.revalidate asks for one; the others' images are fetched concurrently
    (`fetch_rows`), then decoded row by row."""
    index = {label: i for i, label in enumerate(labels)}
    previous = previous or {}
    results: list[Any] = [None] * len(rows)
    wanted: list[tuple[int, tuple[int, ...], Source | None]] = []
    for i, row in enumerate(rows):
        ids = _label_ids(row, index, opts.keep_unlabeled)
        if isinstance(ids, Rejection):
            results[i] = ids
            continue
        before = previous.get(row.id)
        if before is not None and before.uri != row.uri:
            before = None  # the row points elsewhere now: a new image
        if before is not None and opts.revalidate == "none":
            results[i] = Reused(split_of(row.id, opts.val_fraction, opts.test_fraction), row.id, ids, before, False,
                                row)
            continue
        wanted.append((i, ids, before))
    fetched = fetch_rows([rows[i] for i, _, _ in wanted], opts.fetch,
                         [before.validators if before else None for _, _, before in wanted])
    for (i, ids, before), result in zip(wanted, fetched, strict=True):
        results[i] = _encode(rows[i], ids, result, opts, len(labels), before)
    return results


def example_size(result: Result, num_labels: int) -> int:
    """Bytes of the serialized example a result becomes (0 for a rejection). A reused row's is computed
    from its stored image's size: a protobuf's size depends on the lengths of its bytes, not on them."""
    if isinstance(result, Encoded):
        return len(result.record)
    if isinstance(result, Reused):
        return len(to_example(result.id, bytes(result.source.image_bytes), result.label_ids, num_labels))
    return 0


def plan_shards(stats: dict[str, Any], labels: Sequence[str], opts: ExampleOptions, target_bytes: int,
                previous: Mapping[str, Source] | None = None) -> ShardPlan:
    """Encodes the manifest's size sample (`stats["sample"]`, see pipelines.shards) and sizes the
    splits' shards from it and the rows per split. Nothing is fetched without labels: the run
    is about to end in a usage error."""
    if not labels:
        return ShardPlan([], {}, {})
    sample = stats["sample"]
    results = encode_rows(sample, labels, opts, previous)
    sizes = [example_size(r, len(labels)) for r in results]
    return ShardPlan(list(labels), plan_shard_counts(stats["rows_per_split"], sizes, target_bytes),
                     {row.id: result for row, result in zip(sample, results, strict=True)})


class EncodeRows(beam.DoFn):
    """A batch of Rows -> ((split, shard, shards), (id, example, label ids)) for `WriteShards`;
    rejected rows -> `rejected`. Side input: the ShardPlan.

    Batches let `fetch_many` overlap the network latency of many rows on threads inside a
    worker; decoding then runs row by row (CPU-bound, parallel across workers). Logs (INFO) the
    count and rate of examples every `every_s` seconds per worker.
    """

    def __init__(self, options: ExampleOptions, every_s: float = 10.0) -> None:
        self._options = options
        self._every_s = every_s

    def setup(self) -> None:
        self._start = self._last = time.monotonic()
        self._seen = 0

    def process(self, batch: Sequence[Row], plan: ShardPlan, previous: Mapping[str, Source]) -> Iterator[Any]:
        if not plan.labels:  # no usable row or no label: the driver reports it; fetch nothing
            return
        encoded = iter(encode_rows([row for row in batch if row.id not in plan.sample], plan.labels, self._options,
                                   previous))
        fetched = reused = revalidated = 0
        for row in batch:
            result = plan.sample[row.id] if row.id in plan.sample else next(encoded)
            if isinstance(result, Encoded):
                fetched += 1
                self._progress()
                yield beam.pvalue.TaggedOutput(SOURCES_TAG, result.source)
                yield shard_key(result, plan.num_shards)
            elif isinstance(result, Reused):  # its source is written once its example is found
                reused += 1
                revalidated += result.revalidated
                count("rows_reused")
                yield beam.pvalue.TaggedOutput(REUSED_TAG, result)
            else:
                fetched += result.stage in ("fetch", "decode")
                yield rejected(result)
        yield beam.pvalue.TaggedOutput(TALLIES_TAG, (fetched, reused, revalidated))

    def _progress(self) -> None:
        self._seen += 1
        now = time.monotonic()
        if now - self._last >= self._every_s:
            self._last = now
            _LOG.info("%d images encoded so far on this worker (%.1f/s)", self._seen,
                      self._seen / max(now - self._start, 1e-9))
