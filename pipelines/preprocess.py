"""Builds the dataset directory of docs/dataset.md from an image manifest, with Apache Beam.

    python -m pipelines.preprocess --input MovieGenre.csv --output out/ --min_label_count 1000 \\
        [--runner DataflowRunner --project P --region R --temp_location gs://b/tmp --setup_file ./setup.py]

One Beam pipeline: parse, drop duplicate ids, count labels and compute the label vocabulary with
tensorflow-transform into <output>/transform_output/ (from the manifest alone, before any image is
fetched); then, with the labels as a side input, encode labels, fetch + decode + resize images in
batches, split by a hash of the id, write byte-sized TFRecord shards and the dead letter
(rejected-*.jsonl), then labels.txt and, last, dataset.json.
Options are declared in pipelines/options.py (which lists every group); any other argument must be
one of Beam's PipelineOptions (--runner, --project, --region, --temp_location, --setup_file,
--direct_num_workers, --direct_running_mode, ...), or it is an error.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
)

from pipelines import cli, dataset_info, manifests, reuse, runners, vocabulary
from pipelines.examples import EncodeRows, ExampleOptions, plan_shards
from pipelines.fetch import FetchOptions
from pipelines.images import ImageOptions
from pipelines.manifests import ManifestOptions
from pipelines.options import LabelOptions, OutputOptions, SplitOptions
from pipelines.outcomes import (
    COUNTER_NAMESPACE,
    REJECTED_TAG,
    REUSED_TAG,
    SOURCES_TAG,
    TALLIES_TAG,
    WriteRejected,
    WriteSources,
)
from pipelines.shards import ShardPlan, WriteShards
from tagbeam import console, flags, storage
from tagbeam.dataset import DATASET_JSON, TRANSFORM_OUTPUT, labels_text
from tagbeam.flags import UsageError

_LOG = logging.getLogger("pipelines.preprocess")
ENTRY_POINT = "pipelines.preprocess"


@dataclasses.dataclass(frozen=True)
class PreprocessJob:
    """The job's option groups, and the flags as parsed (dataset.json's "options")."""

    manifest: ManifestOptions
    output: OutputOptions
    labels: LabelOptions
    image: ImageOptions
    fetch: FetchOptions
    splits: SplitOptions
    reuse: reuse.ReuseOptions
    flags: dict[str, Any]

    @classmethod
    def from_namespace(cls, namespace: Any) -> PreprocessJob:
        return cls(**flags.build_parts(cls, namespace), flags=dict(vars(namespace)))

    def layout(self) -> dataset_info.Layout:
        return dataset_info.Layout(self.image.stored, self.splits.shard_compression, self.labels.unlabeled)

    def example_options(self) -> ExampleOptions:
        return ExampleOptions(self.fetch, self.image, self.splits.val_fraction, self.splits.test_fraction,
                              self.labels.unlabeled == "keep", self.reuse.revalidate)


def build_parser() -> flags.Parser:
    p = flags.Parser(prog=f"python -m {ENTRY_POINT}", description=__doc__.split("\n\n")[0],
                     epilog="Any other argument must be one of Beam's pipeline options (--runner, --project, ...).")
    flags.add_job_options(p, PreprocessJob)
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[PreprocessJob, list[str]]:
    """The job and its Beam pipeline arguments; a flag error exits 2 with one `error:` line."""
    parser = build_parser()
    namespace, beam_args = flags.parse_with_beam(parser, argv, ENTRY_POINT)
    try:
        job = PreprocessJob.from_namespace(namespace)
    except UsageError as err:
        parser.error(str(err))
    if job.labels.vocab_file and (job.labels.min_label_count != 1 or job.labels.max_labels is not None):
        # A warning, not an error: a scheduler (pipelines.retrain) adds --vocab_file to the user's flags.
        _LOG.warning("--vocab_file fixes the labels; ignoring --min_label_count and --max_labels")
    return job, beam_args


def _work_dir(options: PipelineOptions, elsewhere: str | None) -> str:
    """Scratch space for the run (TFT's temporary files, the label stats), readable by every worker:
    a local folder when they run on this machine, else under --temp_location."""
    if elsewhere is None:
        return tempfile.mkdtemp(prefix="tagbeam-")
    temp_location = options.view_as(GoogleCloudOptions).temp_location
    if not temp_location:
        raise UsageError(f"--temp_location is required when the workers run elsewhere ({elsewhere}): the vocabulary "
                         "analysis stages files there")
    runners.check_paths(options, {"--temp_location": temp_location})
    return storage.join(temp_location, f"tagbeam-{uuid.uuid4().hex}")


class _Paths(NamedTuple):
    work_dir: str
    transform_dir: str  # where dataset.json says the TFT output is
    analysis_dir: str  # where TFT writes it: transform_dir, or a local folder copied there (see run)
    vocab_path: str | None  # the normalized --vocab_file, a TFT asset

    @property
    def stats(self) -> str:
        return storage.join(self.work_dir, "label_stats.json")


def _plan(_: Any, stats: dict[str, Any], fixed: Sequence[str] | None, paths: _Paths, options: ExampleOptions,
          target_bytes: int, previous: dict[str, Any]) -> ShardPlan:
    """The vocabulary and the shard plan, once TFT's output is in place (and published to --output,
    so that dataset.json, written later, never precedes it). Empty labels when the run cannot go on."""
    if paths.analysis_dir != paths.transform_dir:
        dataset_info.copy_tree(paths.analysis_dir, paths.transform_dir)
    labels = []
    if stats["rows"]:
        labels = list(fixed) if fixed else vocabulary.learned_labels(paths.analysis_dir, stats["label_counts"])
    return plan_shards(stats, labels, options, target_bytes, previous)


def build(p: beam.Pipeline, spec: manifests.ManifestSpec, fixed: Sequence[str] | None, paths: _Paths,
          job: PreprocessJob, options_record: dict[str, Any], previous: reuse.Previous | None) -> None:
    """The whole job, ending in dataset.json: parse and de-duplicate the manifest; label stats and
    the TFT vocabulary from the rows; then (with the labels and a shard plan as side inputs, so
    after them) fetch, encode and shard every row - or rebuild it from the `previous` dataset
    (pipelines/reuse.py); the dead letter; the sources; the commit."""
    output, splits, example_options = job.output.output, job.splits, job.example_options()
    parsed = p | "ReadManifest" >> manifests.ReadManifest(spec)
    unique = parsed.rows | "DropDuplicateIds" >> manifests.DropDuplicateIds()
    stats = ((parsed.rows, unique.rows, (parsed.rejected, unique.rejected) | "EarlyRejected" >> beam.Flatten())
             | "ManifestStats" >> vocabulary.ManifestStats(paths.stats, splits.val_fraction, splits.test_fraction))
    analyzed = unique.rows | "Vocabulary" >> vocabulary.AnalyzeVocabulary(
        paths.analysis_dir, storage.join(paths.work_dir, "tft_tmp"), job.labels.min_label_count,
        job.labels.max_labels, paths.vocab_path)
    known = beam.pvalue.AsDict(p | "PreviousSources" >> reuse.ReadSources(previous))
    # Plan's main input is TFT's completion signal; stats is a side input. (A PCollection that is
    # both a side input upstream and a step's main input can make the local runner mis-order stages.)
    plan = analyzed | "Plan" >> beam.Map(_plan, beam.pvalue.AsSingleton(stats), fixed, paths, example_options,
                                         int(splits.target_shard_mb * 2**20), known)
    encoded = (unique.rows
               | "Batch" >> beam.BatchElements(min_batch_size=8, max_batch_size=64)
               | "EncodeRows" >> beam.ParDo(EncodeRows(example_options), beam.pvalue.AsSingleton(plan), known
                                            ).with_outputs(REJECTED_TAG, REUSED_TAG, SOURCES_TAG, TALLIES_TAG,
                                                           main="rows"))
    rebuilt, rebuilt_sources, lost, corrections = (encoded[REUSED_TAG]
                                                   | "ReusedExamples" >> reuse.ReusedExamples(previous, plan))
    shards = ((encoded.rows, rebuilt) | "ToShards" >> beam.Flatten()
              | "WriteShards" >> WriteShards(output, plan, splits.shard_compression))
    rejected_files = ((parsed.rejected, unique.rejected, encoded.rejected, lost)
                      | "DeadLetter" >> WriteRejected(output))
    sources_files = ((encoded[SOURCES_TAG], rebuilt_sources) | "AllSources" >> beam.Flatten()
                     | "Sources" >> WriteSources(output))
    tallies = ((encoded[TALLIES_TAG], corrections) | "AllTallies" >> beam.Flatten()
               | "Tallies" >> beam.CombineGlobally(dataset_info.add_tallies))
    record = dataset_info.ReuseRecord(reuse.fingerprint(job.image, job.fetch), previous.data_dir if previous else "")
    _ = ({"plan": plan, "stats": stats, "shards": shards, "rejected_files": rejected_files, "tallies": tallies,
          "sources_files": sources_files}
         | "CommitDataset" >> dataset_info.CommitDataset(output, job.layout(), options_record, record))


def _counters(result: Any) -> dict[str, int]:
    """Committed tagbeam counters, where the runner reports them (for the summary only)."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        found = result.metrics().query(MetricsFilter().with_namespace(COUNTER_NAMESPACE))["counters"]
    except Exception:  # noqa: BLE001 - some runners do not implement metrics queries
        return {}
    totals: dict[str, int] = {}
    for counter in found:
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + (counter.committed or 0)
    return totals


def run(job: PreprocessJob, pipeline_args: Sequence[str]) -> dict[str, Any]:
    """Runs the job; returns the content of dataset.json. Raises UsageError for user mistakes."""
    start = time.monotonic()
    output, min_label_count = job.output.output, job.labels.min_label_count
    options = cli.pipeline_options(pipeline_args)
    elsewhere = runners.check_paths(options, {**runners.manifest_paths(job.manifest), "--output": output,
                                              "--reuse_dataset": job.reuse.reuse_dataset},
                                    read_here={"--vocab_file": job.labels.vocab_file})
    spec = manifests.resolve_spec(job.manifest)
    fixed = vocabulary.read_vocab_file(job.labels.vocab_file) if job.labels.vocab_file else None
    previous = reuse.previous_dataset(job.reuse, output, job.image, job.fetch)
    work_dir = _work_dir(options, elsewhere)
    try:
        # Before the clean-up below may touch --output: a folder that is not this job's stays untouched.
        dataset_info.prepare_output(output, job.output.overwrite)
    except UsageError:
        storage.remove_tree(work_dir)
        raise
    transform_dir = storage.join(output, TRANSFORM_OUTPUT)
    # TFT writes through tf.io, which reaches only real GCS; a local run stages its output locally
    # and copies it with Beam's FileSystems, which also serve GCS emulators and other stores.
    staged = elsewhere is None and storage.is_remote(output)
    try:
        vocab_path = None
        if fixed:
            # A normalized copy (no blank lines or padding) that every worker can read as a TFT asset.
            vocab_path = storage.write_text(storage.join(work_dir, "vocab.txt"), labels_text(fixed))
        paths = _Paths(work_dir, transform_dir,
                       storage.join(work_dir, TRANSFORM_OUTPUT) if staged else transform_dir, vocab_path)
        _LOG.info("%s manifest %s (%d file(s))", spec.format, job.manifest.input, len(spec.files))
        record = {**job.flags, "format": spec.format,
                  "runner": options.view_as(StandardOptions).runner or "DirectRunner"}
        p = beam.Pipeline(options=options)
        build(p, spec, fixed, paths, job, record, previous)
        built = time.monotonic()
        result = p.run()
        result.wait_until_finish()
        seconds = time.monotonic() - start
        info_path = storage.join(output, DATASET_JSON)
        if not FileSystems.exists(info_path):  # the commit found no labels: say why
            stats = storage.read_json(paths.stats)
            if not stats["rows"]:
                raise vocabulary.no_row_error(job.manifest.input, stats)
            raise vocabulary.no_label_error(stats["label_counts"], min_label_count)
    finally:
        storage.remove_tree(work_dir)
        dataset_info.remove_temporaries(output)  # run files can be as large as the dataset
    info = storage.read_json(info_path)
    print(dataset_info.summary_table(info, seconds, _counters(result)))
    print(f"[preprocess] wrote {output} in {time.monotonic() - start:.1f} s "
          f"(pipeline construction {built - start:.1f} s)")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parse_args, run, argv)


if __name__ == "__main__":
    console.quiet_native_logs()
    sys.exit(main())
