"""The dataset directory of docs/dataset.md, as code: what `pipelines.preprocess` writes and
`trainer`, `pipelines.predict` and `pipelines.retrain` read.

`DatasetInfo` is dataset.json as a typed object: `to_json` is what the pipeline writes,
`from_json` what every reader gets, with its validation and the defaults that older datasets
(written before a field existed) imply. tests/test_contracts.py keeps docs/dataset.md true to it.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from tagbeam import storage
from tagbeam.stored import (  # noqa: F401 - the image enums are part of the dataset contract too
    IMAGE_FORMATS,
    JPEG_SUBSAMPLINGS,
    RESIZE_POLICIES,
    StoredImages,
)
from tagbeam.stored import LEGACY_DEFAULTS as _STORED_LEGACY

FORMAT_VERSION = 1

# --- file names ---------------------------------------------------------------------------------
DATASET_JSON = "dataset.json"  # written last: its presence means the directory is complete
LABELS_TXT = "labels.txt"
TRANSFORM_OUTPUT = "transform_output"
# Written first into every output folder of a tagbeam job: what proves a folder's files are a job's
# own, so that a later run may clear them without --overwrite (a folder without it is the user's).
OUTPUT_MARKER = ".tagbeam-output"
REJECTED_PREFIX = "rejected"
REJECTED_SUFFIX = ".jsonl"
SOURCES_PREFIX = "sources"
SOURCES_SUFFIX = ".jsonl"
SHARD_TEMPLATE = "-SSSSS-of-NNNNN"  # Beam's shard_name_template of the text outputs

# --- enums both sides need ----------------------------------------------------------------------
SPLITS = ("train", "val", "test")
SHARD_COMPRESSIONS = ("none", "gzip")
SHARD_SUFFIXES = {"none": ".tfrecord", "gzip": ".tfrecord.gz"}
TF_COMPRESSION_TYPES = {"none": "", "gzip": "GZIP"}  # tf.data's compression_type of each
UNLABELED_POLICIES = ("reject", "keep")
REJECTION_STAGES = ("parse", "duplicate", "labels", "fetch", "decode")

# --- the pixel contract between the pipeline's decoder and the serving signature ----------------
# JPEG DCT scaling ("draft") decodes at 1/2, 1/4 or 1/8 size, but only as far as keeps at least
# this many times the target per side, so the bilinear filter still does the last >= 2x reduction.
DRAFT_MARGIN = 2

# --- tf.train.Example feature keys --------------------------------------------------------------
FEATURE_ID = "id"
FEATURE_IMAGE = "image"
FEATURE_LABELS = "labels"


def to_example(id_: str, image: bytes, label_ids: Sequence[int], num_labels: int) -> bytes:
    """The serialized tf.train.Example of docs/dataset.md: what the pipeline writes and every reader
    parses with the FEATURE_* keys (TensorFlow's protobufs, imported here only)."""
    from tensorflow.core.example import example_pb2, feature_pb2

    multi_hot = [0] * num_labels
    for label in label_ids:
        multi_hot[label] = 1
    features = feature_pb2.Features(feature={
        FEATURE_ID: feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[id_.encode("utf-8")])),
        FEATURE_IMAGE: feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[image])),
        FEATURE_LABELS: feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=multi_hot)),
    })
    # deterministic: map entries sorted by key, so that equal examples are equal bytes in every process
    return example_pb2.Example(features=features).SerializeToString(deterministic=True)

# What a dataset.json without a field means: those fields were added later, and datasets written
# before hold GZIP shards (and what tagbeam.stored says of the image fields).
LEGACY_DEFAULTS = {"shard_compression": "gzip", **_STORED_LEGACY}


class DatasetError(ValueError):
    """The dataset directory is missing, incomplete or inconsistent; the message says what to do."""


def shard_name(split: str, index: int, num_shards: int, compression: str = "none") -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIXES[compression]}"


# --- labels.txt ---------------------------------------------------------------------------------

def check_label(label: str) -> str | None:
    """Why `label` cannot be a label (a line of labels.txt), or None."""
    if not label or label != label.strip():
        return "a label must be non-empty without leading or trailing whitespace"
    if any(c in label for c in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"):
        return "a label must not contain a line break"
    return None


def labels_text(labels: Iterable[str]) -> str:
    """labels.txt: one label per line; line i is index i of the multi-hot."""
    labels = list(labels)
    for label in labels:
        problem = check_label(label)
        if problem:
            raise ValueError(f"label {label!r}: {problem}")
    return "".join(f"{label}\n" for label in labels)


def parse_labels_text(text: str) -> list[str]:
    """The labels of a labels.txt (or a user's --vocab_file): one per line, surrounding
    whitespace ignored, blank lines skipped."""
    return [line.strip() for line in text.split("\n") if line.strip()]


def read_labels(path: str) -> list[str]:
    return parse_labels_text(storage.read_text(path))


# --- the dead letter ----------------------------------------------------------------------------

class Rejection(NamedTuple):
    """One line of rejected-*.jsonl: an input row that is not in the dataset, and why."""

    file: str  # the manifest file (matters when --input is a glob over several)
    row: int  # 1-based data row within `file`
    id: str
    uri: str
    stage: str  # one of REJECTION_STAGES
    reason: str  # a short machine-readable token (also the counter name's tail)
    detail: str  # for people

    @property
    def key(self) -> str:
        """"stage:reason", the key of dataset.json's rejected_by_reason."""
        return f"{self.stage}:{self.reason}"

    def to_json(self) -> str:
        return json.dumps(self._asdict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Rejection:
        return cls(**json.loads(line))


def unexpected(err: BaseException) -> tuple[str, str]:
    """(reason, detail) of a rejection for an exception no more specific rule names: the reason is
    `unexpected_<ExceptionType>`, so counters and the dead letter say what actually happened."""
    return f"unexpected_{type(err).__name__}", f"{type(err).__name__}: {str(err)[:200]}"


def rejected_file_pattern(folder: str) -> str:
    return storage.join(folder, f"{REJECTED_PREFIX}-*{REJECTED_SUFFIX}")


# --- where each example's image came from -------------------------------------------------------

class Source(NamedTuple):
    """One line of sources-*.jsonl: where an example's stored image came from, so that a later run
    (`--reuse_dataset`) can tell that the source is unchanged and take the stored image instead of
    fetching and decoding it again."""

    id: str
    uri: str  # as resolved by the pipeline (absolute path, gs:// or http(s)://)
    validators: Mapping[str, Any]  # pipelines.fetch.Fetched.validators of the fetch that gave the image
    image_bytes: int  # size of the stored (encoded) image

    def to_json(self) -> str:
        return json.dumps({**self._asdict(), "validators": dict(sorted(self.validators.items()))},
                          ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Source:
        record = json.loads(line)  # keys a later version may add are left out
        return cls(**{name: record[name] for name in cls._fields})


def sources_file_pattern(folder: str) -> str:
    return storage.join(folder, f"{SOURCES_PREFIX}-*{SOURCES_SUFFIX}")


# --- dataset.json -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SplitInfo:
    examples: int = 0
    shards: int = 0
    files: tuple[str, ...] = ()  # shard file names, relative to the dataset directory
    bytes: int = 0
    label_counts: Mapping[str, int] = dataclasses.field(default_factory=dict)  # positives per label

    def to_json(self) -> dict[str, Any]:
        return {"examples": self.examples, "shards": self.shards, "files": list(self.files), "bytes": self.bytes,
                "label_counts": dict(self.label_counts)}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """dataset.json. `data_dir` is where it was read from (not part of the file)."""

    labels: tuple[str, ...]
    image_size: int
    image_format: str
    resize_policy: str
    splits: Mapping[str, SplitInfo]
    jpeg_quality: int = LEGACY_DEFAULTS["jpeg_quality"]
    jpeg_subsampling: str = LEGACY_DEFAULTS["jpeg_subsampling"]
    shard_compression: str = LEGACY_DEFAULTS["shard_compression"]
    input_rows: int = 0
    rejected: int = 0
    rejected_by_reason: Mapping[str, int] = dataclasses.field(default_factory=dict)
    rejected_files: tuple[str, ...] = ()
    unlabeled_policy: str = "reject"
    # What makes a stored image from a source and decides whether a source is accepted
    # (pipelines.reuse.fingerprint): a later run reuses this dataset's images only if its own is the
    # same. "" (older datasets): never.
    image_fingerprint: str = ""
    rows_fetched: int = 0  # rows whose image was requested and not found unchanged (whatever happened next)
    rows_reused: int = 0  # examples whose stored image came from `reused_from`, not fetched
    rows_revalidated: int = 0  # of those, confirmed unchanged by a conditional request
    reused_from: str = ""  # the dataset of --reuse_dataset, if any of it was reused
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # every flag of the run
    created: str = ""
    format_version: int = FORMAT_VERSION
    data_dir: str = dataclasses.field(default="", compare=False)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def compression_type(self) -> str:
        """tf.data's compression_type of the shards: "" or "GZIP"."""
        return TF_COMPRESSION_TYPES[self.shard_compression]

    @property
    def stored_images(self) -> StoredImages:
        return StoredImages(**{f.name: getattr(self, f.name) for f in dataclasses.fields(StoredImages)})

    @property
    def examples(self) -> int:
        return sum(s.examples for s in self.splits.values())

    def split(self, name: str) -> SplitInfo:
        """The split's info; a split absent from dataset.json is an empty split."""
        return self.splits.get(name) or SplitInfo(label_counts={label: 0 for label in self.labels})

    def shard_paths(self, split: str) -> tuple[str, ...]:
        return tuple(storage.join(self.data_dir, name) for name in self.split(split).files)

    def label_count_vector(self, split: str) -> list[int]:
        """Positives per label of `split`, in labels.txt order."""
        counts = self.split(split).label_counts
        return [int(counts.get(label, 0)) for label in self.labels]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "labels": list(self.labels),
            "num_labels": self.num_labels,
            "image_size": self.image_size,
            "image_format": self.image_format,
            "jpeg_quality": self.jpeg_quality,
            "jpeg_subsampling": self.jpeg_subsampling,
            "resize_policy": self.resize_policy,
            "shard_compression": self.shard_compression,
            "splits": {name: split.to_json() for name, split in self.splits.items()},
            "input_rows": self.input_rows,
            "rejected": self.rejected,
            "rejected_by_reason": dict(self.rejected_by_reason),
            "rejected_files": list(self.rejected_files),
            "unlabeled_policy": self.unlabeled_policy,
            "image_fingerprint": self.image_fingerprint,
            "rows_fetched": self.rows_fetched,
            "rows_reused": self.rows_reused,
            "rows_revalidated": self.rows_revalidated,
            "reused_from": self.reused_from,
            "options": dict(self.options),
            "created": self.created,
        }

    @classmethod
    def from_json(cls, meta: Any, where: str = DATASET_JSON, data_dir: str = "") -> DatasetInfo:
        """Checks a parsed dataset.json; raises DatasetError naming `where` and the field."""
        if not isinstance(meta, dict):
            raise DatasetError(f"{where} is not a JSON object")

        def field(key: str, kind: type, default: Any = dataclasses.MISSING) -> Any:
            if key not in meta:
                if default is not dataclasses.MISSING:
                    return default
                raise DatasetError(f"{where} has no {key!r}: it was not written by `python -m pipelines.preprocess` "
                                   "(docs/dataset.md)")
            value = meta[key]
            if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
                raise DatasetError(f"{where}: {key!r} must be {kind.__name__}, got {value!r}")
            return value

        def choice(key: str, choices: Sequence[str]) -> str:
            value = field(key, str, LEGACY_DEFAULTS.get(key, dataclasses.MISSING))
            if value not in choices:
                raise DatasetError(f"{where}: {key} {value!r} is not one of {tuple(choices)}")
            return value

        labels = tuple(field("labels", list))
        num_labels = field("num_labels", int)
        if num_labels != len(labels) or num_labels < 1:
            raise DatasetError(f"{where}: num_labels={num_labels} but {len(labels)} labels are listed")
        field("image_size", int)  # this message for a file that is no dataset.json at all
        stored = StoredImages.from_json(meta, lambda problem: DatasetError(f"{where}: {problem}"))
        splits = {}
        for name, split in field("splits", dict).items():
            if name not in SPLITS or not isinstance(split, dict):
                raise DatasetError(f"{where}: splits has an unknown entry {name!r}; splits are {SPLITS}")
            counts = split.get("label_counts", {})
            splits[name] = SplitInfo(int(split.get("examples", 0)), int(split.get("shards", 0)),
                                     tuple(split.get("files", [])), int(split.get("bytes", 0)),
                                     {label: int(counts.get(label, 0)) for label in labels})
        return cls(
            labels=labels,
            **stored.to_json(),
            splits=splits,
            shard_compression=choice("shard_compression", SHARD_COMPRESSIONS),
            input_rows=field("input_rows", int, 0),
            rejected=field("rejected", int, 0),
            rejected_by_reason=field("rejected_by_reason", dict, {}),
            rejected_files=tuple(field("rejected_files", list, [])),
            unlabeled_policy=field("unlabeled_policy", str, "reject"),
            image_fingerprint=field("image_fingerprint", str, ""),
            rows_fetched=field("rows_fetched", int, 0),
            rows_reused=field("rows_reused", int, 0),
            rows_revalidated=field("rows_revalidated", int, 0),
            reused_from=field("reused_from", str, ""),
            options=field("options", dict, {}),
            created=field("created", str, ""),
            format_version=field("format_version", int, FORMAT_VERSION),
            data_dir=data_dir,
        )


def read(data_dir: str) -> DatasetInfo:
    """Reads and checks dataset.json and labels.txt of `data_dir` (local or gs://), and that every
    shard it lists exists. Raises DatasetError with what to do."""
    json_path = storage.join(data_dir, DATASET_JSON)
    if not storage.exists(json_path):
        hint = ("its listing shows no dataset directory" if not storage.match(storage.join(data_dir, "*"))
                else "the pipeline writes dataset.json last, so it may also be incomplete")
        raise DatasetError(f"--data_dir {data_dir}: no dataset.json ({hint}). Run `python -m pipelines.preprocess` "
                           "to create the dataset directory first, or check the path.")
    try:
        meta = json.loads(storage.read_text(json_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{json_path} is not valid JSON ({e}); rerun `python -m pipelines.preprocess`") from e
    info = DatasetInfo.from_json(meta, json_path, data_dir)
    labels_path = storage.join(data_dir, LABELS_TXT)
    if not storage.exists(labels_path):
        raise DatasetError(f"{labels_path} is missing: the dataset directory is incomplete; "
                           "rerun `python -m pipelines.preprocess`")
    listed = tuple(read_labels(labels_path))
    if listed != info.labels:
        raise DatasetError(
            f"{labels_path} ({len(listed)} labels) disagrees with the labels in {json_path} ({len(info.labels)}); "
            "the directory mixes two pipeline runs: rerun `python -m pipelines.preprocess` into an empty folder")
    present = {path.rstrip("/").rsplit("/", 1)[-1] for path in storage.match(storage.join(data_dir, "*"))}
    for name in SPLITS:
        missing = [f for f in info.split(name).files if f not in present]
        if missing:
            raise DatasetError(f"{json_path} lists {len(missing)} {name} shard(s) missing from {data_dir}, "
                               f"e.g. {missing[0]}")
    return info
