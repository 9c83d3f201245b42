"""The label vocabulary, computed (or fixed) with tensorflow-transform inside the pipeline.

The vocabulary is analysed from the manifest's labels alone, before any image is fetched: the
rows go through `AnalyzeDataset` and the TFT output is written (`WriteTransformFn`); the labels
then reach the image step as a side input, which the runner computes before that step starts.
So a bad `--min_label_count` ends the run without a single image fetched. The multi-hot width
K is therefore known per row (a dict lookup) rather than taken from TFT's output schema, where a
vocabulary-sized width fails. The saved transform maps raw labels to ids (`label_ids`, -1 for
unknown labels) for users and serving, via `TFTransformOutput`.

Label counts are over parsed, de-duplicated rows (each row counts a label once), before any image
is fetched: a label's count includes rows whose image later fails.
"""
from __future__ import annotations

import functools
import heapq
from collections import Counter
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines.manifests import text_lines
from pipelines.shards import SAMPLE_ROWS, sample_key
from pipelines.splits import split_of
from tagbeam import storage
from tagbeam.dataset import check_label, parse_labels_text
from tagbeam.flags import UsageError

VOCABULARY_NAME = "labels"
OUTPUT_FEATURE = "label_ids"


def _min_count_fn(inputs: dict, frequency_threshold: int, top_k: int | None) -> dict:
    import tensorflow_transform as tft

    ids = tft.compute_and_apply_vocabulary(inputs["labels"], top_k=top_k, frequency_threshold=frequency_threshold,
                                           default_value=-1, vocab_filename=VOCABULARY_NAME)
    return {OUTPUT_FEATURE: ids}


def _fixed_fn(inputs: dict, vocab_path: str) -> dict:
    import tensorflow as tf
    import tensorflow_transform as tft

    # Built through make_and_track_object so the file becomes an asset of the saved transform
    # (a bare path constant would point at the original file forever).
    table = tft.annotators.make_and_track_object(lambda: tf.lookup.StaticHashTable(
        tf.lookup.TextFileInitializer(vocab_path, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                                      tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER), -1), name="labels_table")
    labels = tf.RaggedTensor.from_sparse(inputs["labels"])
    return {OUTPUT_FEATURE: tf.ragged.map_flat_values(table.lookup, labels).to_sparse()}


class AnalyzeVocabulary(beam.PTransform):
    """Rows -> TFT transform output in `transform_dir`; returns a one-element PCollection that
    exists once the output is in place. With `vocab_path` the order is fixed by that file (one
    label per line, already normalized); otherwise TFT keeps labels used by at least `min_count`
    rows, the `max_labels` most frequent if set, ordered by frequency."""

    def __init__(self, transform_dir: str, temp_dir: str, min_count: int, max_labels: int | None,
                 vocab_path: str | None) -> None:
        super().__init__()
        self._transform_dir = transform_dir
        self._temp_dir = temp_dir
        if vocab_path:
            self._fn = functools.partial(_fixed_fn, vocab_path=vocab_path)
        else:
            # TFT warns that a threshold of 1 is a no-op and wants None for "keep every label".
            self._fn = functools.partial(_min_count_fn, frequency_threshold=min_count if min_count > 1 else None,
                                         top_k=max_labels)

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        import tensorflow as tf
        import tensorflow_transform.beam as tft_beam
        from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

        metadata = dataset_metadata.DatasetMetadata(
            schema_utils.schema_from_feature_spec({"labels": tf.io.VarLenFeature(tf.string)}))
        instances = rows | "LabelsOnly" >> beam.Map(lambda r: {"labels": list(r.labels)})
        with tft_beam.Context(temp_dir=self._temp_dir):
            transform_fn = (instances, metadata) | "Analyze" >> tft_beam.AnalyzeDataset(self._fn)
            return transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(self._transform_dir)


class StatsFn(beam.CombineFn):
    """In one pass over ("read", parsed row), ("rows", kept row) and ("rejected", record) items:
    input rows (parsed rows and parse rejections), kept rows, rejections by reason, kept rows per
    label and per split, and the shard size sample (the SAMPLE_ROWS kept rows with the smallest
    `sample_key`, see pipelines.shards)."""

    def __init__(self, val_fraction: float, test_fraction: float) -> None:
        self._fractions = (val_fraction, test_fraction)

    def create_accumulator(self) -> tuple[list[Counter], list]:
        # totals, rejected by reason, labels, splits; a max-heap of (-key, id, row) for the sample
        return [Counter(), Counter(), Counter(), Counter()], []

    def add_input(self, acc: tuple[list[Counter], list], item: tuple[str, Any]) -> tuple[list[Counter], list]:
        counters, sample = acc
        kind, value = item
        counters[0][kind] += 1
        if kind == "rejected":
            counters[1][value.key] += 1
            counters[0]["input_rows"] += value.stage == "parse"
            return acc
        if kind == "read":
            counters[0]["input_rows"] += 1
            return acc
        counters[2].update(value.labels)
        counters[3][split_of(value.id, *self._fractions)] += 1
        entry = (-sample_key(value.id), value.id, value)
        if len(sample) < SAMPLE_ROWS:
            heapq.heappush(sample, entry)
        elif entry > sample[0]:
            heapq.heapreplace(sample, entry)
        return acc

    def merge_accumulators(self, accs: Iterable[tuple[list[Counter], list]]) -> tuple[list[Counter], list]:
        counters, entries = self.create_accumulator()
        for acc_counters, sample in accs:
            for total, part in zip(counters, acc_counters, strict=True):
                total.update(part)
            entries.extend(sample)
        sample = heapq.nlargest(SAMPLE_ROWS, entries)
        heapq.heapify(sample)
        return counters, sample

    def extract_output(self, acc: tuple[list[Counter], list]) -> dict[str, Any]:
        counters, sample = acc
        return {"input_rows": counters[0]["input_rows"], "rows": counters[0]["rows"],
                "rejected": counters[0]["rejected"],
                "rejected_by_reason": dict(counters[1]), "label_counts": dict(counters[2]),
                "rows_per_split": dict(counters[3]), "sample": [row for _, _, row in sorted(sample, reverse=True)]}


class ManifestStats(beam.PTransform):
    """(parsed rows, kept rows, rejected records) -> one stats dict (see StatsFn); its JSON-able
    part (all but the sample rows) is also written to `path`, for the driver's error messages."""

    def __init__(self, path: str, val_fraction: float, test_fraction: float) -> None:
        super().__init__()
        self._path = path
        self._fractions = (val_fraction, test_fraction)

    def expand(self, inputs: tuple[beam.PCollection, beam.PCollection, beam.PCollection]) -> beam.PCollection:
        parsed, rows, rejected = inputs
        path = self._path
        stats = ((parsed | "TagRead" >> beam.Map(lambda r: ("read", r)),
                  rows | "TagRows" >> beam.Map(lambda r: ("rows", r)),
                  rejected | "TagRejected" >> beam.Map(lambda r: ("rejected", r)))
                 | "All" >> beam.Flatten()
                 | "Count" >> beam.CombineGlobally(StatsFn(*self._fractions)))
        _ = stats | "Write" >> beam.Map(lambda s: storage.write_json(path, {k: v for k, v in s.items() if k != "sample"}))
        return stats


def read_vocab_file(path: str) -> list[str]:
    """Labels of a labels.txt (one per line, blank lines ignored). Raises UsageError."""
    try:
        with FileSystems.open(path) as handle:
            labels = parse_labels_text("\n".join(text_lines(handle)))
    except Exception as err:  # noqa: BLE001 - BeamIOError wraps the store's own errors
        raise UsageError(f"--vocab_file {path}: cannot read it ({err}); give a labels.txt, "
                         "one label per line") from None
    bad = [(label, check_label(label)) for label in labels if check_label(label)]
    if bad:
        raise UsageError(f"--vocab_file {path}: label {bad[0][0]!r}: {bad[0][1]}")
    repeated = [label for label, n in Counter(labels).items() if n > 1]
    if not labels or repeated:
        problem = "it is empty" if not labels else f"it repeats {repeated[:5]}"
        raise UsageError(f"--vocab_file {path}: {problem}; a vocabulary lists each label once, one per line")
    return labels


def learned_labels(transform_dir: str, label_counts: dict[str, int]) -> list[str]:
    """The vocabulary TFT wrote, in its order (empty when no label survived)."""
    import tensorflow_transform as tft

    vocabulary = tft.TFTransformOutput(transform_dir).vocabulary_by_name(VOCABULARY_NAME)
    # An empty TFT vocabulary holds one dummy token, which no row ever carries.
    return [token.decode("utf-8") for token in vocabulary if token.decode("utf-8") in label_counts]


def no_label_error(label_counts: dict[str, int], min_count: int) -> UsageError:
    top = ", ".join(f"{label} ({n})" for label, n in Counter(label_counts).most_common(5)) or "none"
    return UsageError(f"no label is used by at least --min_label_count {min_count} rows; the most frequent "
                      f"labels are: {top}; lower --min_label_count")


def no_row_error(input_: str, stats: dict[str, Any]) -> UsageError:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats["rejected_by_reason"].items()))
    return UsageError(f"--input {input_}: no usable row among {stats['rejected']} ({reasons}); "
                      "check the manifest's URI and id columns")

