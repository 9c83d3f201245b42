"""The pipeline's side of the dataset directory (tagbeam.dataset): preparing --output, and the
commit - labels.txt, then dataset.json, last.

dataset.json is built from what the pipeline itself wrote (shard stats, the dead-letter files, the
count of input rows), not from metrics, which some runners report late or not at all.
"""
from __future__ import annotations

import dataclasses
import datetime
import glob
import os
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines.shards import ShardPlan
from tagbeam import storage
from tagbeam.dataset import (
    DATASET_JSON,
    LABELS_TXT,
    OUTPUT_MARKER,
    REJECTED_PREFIX,
    REJECTED_SUFFIX,
    SHARD_SUFFIXES,
    SOURCES_PREFIX,
    SOURCES_SUFFIX,
    SPLITS,
    TRANSFORM_OUTPUT,
    DatasetInfo,
    Rejection,
    SplitInfo,
    StoredImages,
    labels_text,
)
from tagbeam.flags import UsageError

_SHARD_PATTERNS = tuple(f"*{suffix}" for suffix in SHARD_SUFFIXES.values())
_OUTPUT_PATTERNS = (DATASET_JSON, LABELS_TXT, *_SHARD_PATTERNS, f"{REJECTED_PREFIX}-*{REJECTED_SUFFIX}",
                    f"{SOURCES_PREFIX}-*{SOURCES_SUFFIX}")
# Temporary files (`<name>.tmp-<uuid>`) and folders (the shard writer's `runs.tmp-<uuid>/`).
_TEMPORARIES = f"*{storage.TEMP_MARK}*"


class InvariantError(RuntimeError):
    """The pipeline lost or duplicated rows: a bug, never the user's fault."""


def claim_output(output: str, overwrite: bool, entry_point: str) -> bool:
    """Makes `output` a folder of this job's, before anything is written or removed there.

    Refuses (UsageError) a path that is a file, a place that cannot be written, and a non-empty folder
    that no tagbeam job wrote (no OUTPUT_MARKER) unless `overwrite`: a job removes only what it can
    prove it wrote. Returns whether the folder was a tagbeam job's before (its left-overs may go).
    """
    if not storage.is_remote(output) and os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"--output {output} is a file; give a folder (new or empty, or one this job wrote)")
    marker = storage.join(output, OUTPUT_MARKER)
    ours = storage.exists(marker)
    if storage.is_remote(output):
        others = [p for p in storage.match(storage.join(output, "**")) if not p.endswith("/" + OUTPUT_MARKER)]
    else:
        others = sorted(os.listdir(output)) if os.path.isdir(output) else []
        others = [name for name in others if name != OUTPUT_MARKER]
    if others and not ours and not overwrite:
        shown = ", ".join(p.rstrip("/").rsplit("/", 1)[-1] for p in others[:3])
        raise UsageError(f"--output {output} holds files no tagbeam job wrote ({shown}{', ...' if len(others) > 3 else ''}); "
                               "choose a new or empty folder, or pass --overwrite to let this job replace its own kind "
                               "of files there")
    try:
        storage.write_json(marker, {"written_by": entry_point})
    except Exception as err:  # noqa: BLE001 - OSError locally, the store's own errors elsewhere
        raise UsageError(f"--output {output} cannot be written ({type(err).__name__}: {err}); "
                               "choose a folder you can write") from None
    return ours


def prepare_output(output: str, overwrite: bool) -> None:
    """Refuses an output folder that holds a dataset unless `overwrite`; clears our files either way.

    dataset.json goes first, so an interrupted clean-up never leaves a folder that looks complete.
    Left-overs of a failed run (transform output, a dead letter, temporary files) are replaced
    silently; shards or a dataset.json are only replaced with --overwrite; a folder holding files
    no tagbeam job wrote is refused without --overwrite (claim_output).
    """
    if not overwrite and any(storage.match(storage.join(output, p)) for p in (DATASET_JSON, *_SHARD_PATTERNS)):
        raise UsageError(f"--output {output} already holds a dataset (dataset.json or shards); pass --overwrite "
                         "to replace it, or choose another --output")
    claim_output(output, overwrite, "pipelines.preprocess")
    for pattern in _OUTPUT_PATTERNS:
        found = storage.match(storage.join(output, pattern))
        if found:
            FileSystems.delete(found)
    remove_temporaries(output)
    storage.remove_tree(storage.join(output, TRANSFORM_OUTPUT))
    storage.makedirs(output)


def copy_tree(local_dir: str, destination: str) -> None:
    """Copies a local folder to any Beam file system (used for the TFT output; see preprocess)."""
    for folder, _, files in os.walk(local_dir):
        for name in files:
            source = os.path.join(folder, name)
            relative = os.path.relpath(source, local_dir).replace(os.sep, "/")
            with open(source, "rb") as f:
                data = f.read()
            with FileSystems.create(storage.join(destination, relative)) as out:
                out.write(data)


def remove_temporaries(output: str) -> None:
    """Temporary files and folders of this run, or of retried or killed writers (`*.tmp-<uuid>`),
    such as run files of failed bundles that no shard merged."""
    found = storage.match(storage.join(output, _TEMPORARIES)) + storage.match(storage.join(output, f"{_TEMPORARIES}/**"))
    if found:
        FileSystems.delete(found)
    if not storage.is_remote(output):  # local folders outlive their files
        for folder in glob.glob(os.path.join(output, _TEMPORARIES)):
            shutil.rmtree(folder, ignore_errors=True)


def split_summary(split: str, shards: Sequence[dict[str, Any]], labels: Sequence[str]) -> SplitInfo:
    mine = sorted((s for s in shards if s["split"] == split), key=lambda s: s["index"])
    counts = [0] * len(labels)
    for shard in mine:
        counts = [a + b for a, b in zip(counts, shard["label_counts"], strict=True)]
    return SplitInfo(examples=sum(s["examples"] for s in mine), shards=len(mine), files=tuple(s["file"] for s in mine),
                     bytes=sum(s["bytes"] for s in mine), label_counts=dict(zip(labels, counts, strict=True)))


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the dataset stores what it holds, from the job's typed options (dataset.json's "options"
    is only the record of the flags as given)."""

    stored: StoredImages
    shard_compression: str
    unlabeled_policy: str

    def fields(self) -> dict[str, Any]:
        return {**self.stored.to_json(), "shard_compression": self.shard_compression,
                "unlabeled_policy": self.unlabeled_policy}


@dataclasses.dataclass(frozen=True)
class ReuseRecord:
    """What dataset.json says about where the images came from (docs/dataset.md)."""

    image_fingerprint: str
    reused_from: str = ""  # the --reuse_dataset folder, when it was usable
    tallies: tuple[int, int, int] = (0, 0, 0)  # rows fetched, reused, revalidated

    def fields(self) -> dict[str, Any]:
        fetched, reused, revalidated = self.tallies
        return {"image_fingerprint": self.image_fingerprint, "rows_fetched": fetched, "rows_reused": reused,
                "rows_revalidated": revalidated, "reused_from": self.reused_from if reused else ""}


def add_tallies(tallies: Iterable[tuple[int, int, int]]) -> tuple[int, int, int]:
    total = [0, 0, 0]
    for tally in tallies:
        total = [a + b for a, b in zip(total, tally, strict=True)]
    return tuple(total)  # type: ignore[return-value]


def build_info(*, labels: Sequence[str], input_rows: int, rejected_by_reason: dict[str, int],
               shards: Sequence[dict[str, Any]], rejected_files: Sequence[str], layout: Layout,
               options: dict[str, Any], reuse: ReuseRecord | None = None, created: str | None = None) -> DatasetInfo:
    """The dataset.json record of docs/dataset.md. Raises InvariantError if rows were lost."""
    splits = {split: split_summary(split, shards, labels) for split in SPLITS}
    for split, summary in splits.items():
        expected = {s["num_shards"] for s in shards if s["split"] == split}
        if expected and expected != {summary.shards}:
            raise InvariantError(f"split {split}: wrote {summary.shards} shard files of {sorted(expected)}")
    examples = sum(s.examples for s in splits.values())
    rejected = sum(rejected_by_reason.values())
    if input_rows != examples + rejected:
        raise InvariantError(f"row accounting failed: input_rows {input_rows} != examples {examples} "
                             f"+ rejected {rejected} (by split: "
                             f"{ {k: v.examples for k, v in splits.items()} }); this is a bug, please report it")
    return DatasetInfo(
        labels=tuple(labels),
        **layout.fields(),
        splits=splits,
        input_rows=input_rows,
        rejected=rejected,
        rejected_by_reason=dict(sorted(rejected_by_reason.items())),
        rejected_files=tuple(sorted(os.path.basename(f) for f in rejected_files)),
        **(reuse or ReuseRecord("")).fields(),
        options=options,
        created=created or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def count_rejected(rejected_files: Sequence[str]) -> dict[str, int]:
    """Rejected rows by "stage:reason", counted in the dead-letter files as written."""
    counts: dict[str, int] = {}
    for path in rejected_files:
        for line in storage.read_text(path).splitlines():
            if line.strip():
                key = Rejection.from_json(line).key
                counts[key] = counts.get(key, 0) + 1
    return counts


def commit(_: Any, *, output: str, plan: ShardPlan, stats: dict[str, Any], layout: Layout, options: dict[str, Any],
           shards: Sequence[dict[str, Any]], rejected_files: Sequence[str], reuse: ReuseRecord,
           tallies: tuple[int, int, int], sources_files: Sequence[str]) -> dict[str, Any] | None:
    """Writes labels.txt, then dataset.json, last. Runs after every shard, dead-letter and sources
    file is final, because their outputs are its side inputs (`sources_files` only for that). Without labels (no usable row, or no label
    left) it writes nothing: no row was encoded, and the driver reports why."""
    labels = plan.labels
    if not labels:
        return None
    info = build_info(labels=labels, input_rows=stats["input_rows"], rejected_by_reason=count_rejected(rejected_files),
                      shards=shards, rejected_files=rejected_files, layout=layout, options=options,
                      reuse=dataclasses.replace(reuse, tallies=tallies)).to_json()
    storage.write_text(storage.join(output, LABELS_TXT), labels_text(labels))
    storage.write_json(storage.join(output, DATASET_JSON), info)
    return info


class CommitDataset(beam.PTransform):
    """Side inputs: the plan (its labels), the manifest stats (input rows), shard stats, dead-letter
    files, the fetched/reused tallies."""

    def __init__(self, output: str, layout: Layout, options: dict[str, Any], reuse: ReuseRecord) -> None:
        super().__init__()
        self._output, self._layout, self._options, self._reuse = output, layout, options, reuse

    def expand(self, inputs: dict[str, beam.PCollection]) -> beam.PCollection:
        # A main input of its own: one shared with an upstream side input can deadlock stage ordering.
        return (inputs["plan"].pipeline
                | "Once" >> beam.Create([None])
                | "Commit" >> beam.Map(
                    commit, output=self._output, layout=self._layout, options=self._options, reuse=self._reuse,
                    tallies=beam.pvalue.AsSingleton(inputs["tallies"]),
                    plan=beam.pvalue.AsSingleton(inputs["plan"]),
                    stats=beam.pvalue.AsSingleton(inputs["stats"]),
                    shards=beam.pvalue.AsList(inputs["shards"]),
                    rejected_files=beam.pvalue.AsList(inputs["rejected_files"]),
                    sources_files=beam.pvalue.AsList(inputs["sources_files"])))


def summary_table(info: dict[str, Any], seconds: float, counters: dict[str, int]) -> str:
    """A plain-text report: outcomes, splits, time and throughput."""
    written = sum(s["examples"] for s in info["splits"].values())
    lines = [f"{'outcome':<40} {'rows':>10}", f"{'input rows':<40} {info['input_rows']:>10}",
             f"{'examples written':<40} {written:>10}"]
    lines += [f"  {split:<38} {s['examples']:>10}  ({s['shards']} shards, {s['bytes'] / 2**20:.1f} MiB)"
              for split, s in info["splits"].items()]
    lines.append(f"{'rejected':<40} {info['rejected']:>10}")
    lines += [f"  {reason:<38} {n:>10}" for reason, n in info["rejected_by_reason"].items()]
    if counters:
        lines.append("counters (tagbeam):")
        lines += [f"  {name:<38} {n:>10}" for name, n in sorted(counters.items())]
    lines.append(f"{info['num_labels']} labels; {seconds:.1f} s; {written / max(seconds, 1e-9):.1f} images/s")
    return "\n".join(lines)
