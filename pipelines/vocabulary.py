"""The label vocabulary, computed (or fixed) with tensorflow-transform in a cheap first pass.

Why a separate pass: the multi-hot width K must be static in the examples (a width taken from a
TFT vocabulary at analysis time fails in TFT's output schema), and a bad `--min_label_count`
should fail before a single image is fetched. So the analysis pass reads only the manifest's
labels, runs `AnalyzeDataset` and writes the TFT output (`WriteTransformFn`); the main pass then
knows K and multi-hot encodes with a dict lookup. The saved transform maps raw labels to ids
(`label_ids`, -1 for unknown labels) for users and serving, via `TFTransformOutput`.

Label counts are over parsed, de-duplicated rows (each row counts a label once), before any image
is fetched: a label's count includes rows whose image later fails.
"""
from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines.dataset_info import write_json
from pipelines.manifests import UsageError, text_lines

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
    """Rows -> TFT transform output in `transform_dir`. With `vocab_path` the order is fixed by
    that file (one label per line, already normalized); otherwise TFT keeps labels used by at
    least `min_count` rows, the `max_labels` most frequent if set, ordered by frequency."""

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

    def expand(self, rows: beam.PCollection) -> beam.pvalue.PDone:
        import tensorflow as tf
        import tensorflow_transform.beam as tft_beam
        from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

        metadata = dataset_metadata.DatasetMetadata(
            schema_utils.schema_from_feature_spec({"labels": tf.io.VarLenFeature(tf.string)}))
        instances = rows | "LabelsOnly" >> beam.Map(lambda r: {"labels": list(r.labels)})
        with tft_beam.Context(temp_dir=self._temp_dir):
            transform_fn = (instances, metadata) | "Analyze" >> tft_beam.AnalyzeDataset(self._fn)
            return transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(self._transform_dir)


class _StatsFn(beam.CombineFn):
    """Counts rows, parse rejections by reason, and rows per label, in one pass."""

    def create_accumulator(self) -> list[Counter]:
        return [Counter(), Counter(), Counter()]  # totals, rejected by reason, labels

    def add_input(self, acc: list[Counter], item: tuple[str, Any]) -> list[Counter]:
        kind, value = item
        acc[0][kind] += 1
        if kind == "rejected":
            acc[1][f"{value['stage']}:{value['reason']}"] += 1
        else:
            acc[2].update(value.labels)
        return acc

    def merge_accumulators(self, accs: Iterable[list[Counter]]) -> list[Counter]:
        merged = self.create_accumulator()
        for acc in accs:
            for total, part in zip(merged, acc):
                total.update(part)
        return merged

    def extract_output(self, acc: list[Counter]) -> dict[str, Any]:
        return {"rows": acc[0]["rows"], "rejected": acc[0]["rejected"], "rejected_by_reason": dict(acc[1]),
                "label_counts": dict(acc[2])}


class WriteLabelStats(beam.PTransform):
    """Kept rows and rejected records -> one JSON file of row and label counts."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def expand(self, inputs: tuple[beam.PCollection, beam.PCollection]) -> beam.PCollection:
        rows, rejected = inputs
        path = self._path
        return ((rows | "TagRows" >> beam.Map(lambda r: ("rows", r)),
                 rejected | "TagRejected" >> beam.Map(lambda r: ("rejected", r)))
                | "Both" >> beam.Flatten()
                | "Count" >> beam.CombineGlobally(_StatsFn())
                | "Write" >> beam.Map(lambda stats: write_json(path, stats)))


def read_vocab_file(path: str) -> list[str]:
    """Labels of a labels.txt (one per line, blank lines ignored). Raises UsageError."""
    try:
        with FileSystems.open(path) as handle:
            labels = [line.strip() for line in text_lines(handle) if line.strip()]
    except Exception as err:  # noqa: BLE001 - BeamIOError wraps the store's own errors
        raise UsageError(f"--vocab_file {path}: cannot read it ({err}); give a labels.txt, "
                         "one label per line") from None
    repeated = [label for label, n in Counter(labels).items() if n > 1]
    if not labels or repeated:
        problem = "it is empty" if not labels else f"it repeats {repeated[:5]}"
        raise UsageError(f"--vocab_file {path}: {problem}; a vocabulary lists each label once, one per line")
    return labels


def learned_labels(transform_dir: str, label_counts: dict[str, int], min_count: int) -> list[str]:
    """The vocabulary TFT wrote, in its order. Raises UsageError when no label survived."""
    import tensorflow_transform as tft

    vocabulary = tft.TFTransformOutput(transform_dir).vocabulary_by_name(VOCABULARY_NAME)
    # An empty TFT vocabulary holds one dummy token, which no row ever carries.
    labels = [token.decode("utf-8") for token in vocabulary if token.decode("utf-8") in label_counts]
    if not labels:
        top = ", ".join(f"{label} ({n})" for label, n in Counter(label_counts).most_common(5)) or "none"
        raise UsageError(f"no label is used by at least --min_label_count {min_count} rows; the most frequent "
                         f"labels are: {top}; lower --min_label_count")
    return labels
