"""Builds the dataset directory of docs/dataset.md from an image manifest, with Apache Beam.

    python -m pipelines.preprocess --input MovieGenre.csv --output out/ --min_label_count 1000 \\
        [--runner DataflowRunner --project P --region R --temp_location gs://b/tmp --setup_file ./setup.py]

Two pipelines run, on the same runner:
1. analysis (labels only, no images): parse, drop duplicate ids, count labels, and compute the label
   vocabulary with tensorflow-transform into <output>/transform_output/;
2. main: parse, drop duplicate ids, encode labels, fetch + decode + resize images in batches, split
   by a hash of the id, write byte-sized GZIP TFRecord shards and the dead letter
   (rejected-*.jsonl), then labels.txt and, last, dataset.json.
Arguments this parser does not know go to Beam's PipelineOptions (--runner, --project, --region,
--temp_location, --setup_file, --direct_num_workers, --direct_running_mode, ...).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
)

from pipelines import cli, dataset_info, fetch, images, manifests, splits, vocabulary
from pipelines.examples import EncodeLabels, ExampleOptions, FetchAndEncode, LogProgress
from pipelines.manifests import REJECTED_TAG, UsageError
from pipelines.shards import WriteShards

_LOG = logging.getLogger("pipelines.preprocess")
# Runners that execute on this machine: their workers can share a local temporary folder.
_LOCAL_RUNNERS = ("DirectRunner", "FnApiRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")
_FETCH_DEFAULTS = fetch.FetchOptions()
_IMAGE_DEFAULTS = images.ImageOptions()


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m pipelines.preprocess", description=__doc__.split("\n\n")[0],
                allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                epilog="Unknown arguments are passed to Beam's PipelineOptions.")
    io = p.add_argument_group("input and output")
    io.add_argument("--input", required=True,
                    help="manifest file, glob or gs:// URI; for VOC the VOC2012 root folder")
    io.add_argument("--output", required=True, help="dataset folder to write (local or gs://)")
    io.add_argument("--format", default="auto", choices=("auto", *manifests.FORMATS),
                    help="auto: MovieGenre header -> movie_genre, image_name,tags -> planet, a folder with "
                         "Annotations/ -> voc, any other CSV/JSONL/Parquet -> generic")
    io.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    generic = p.add_argument_group("generic manifests (CSV, JSONL, Parquet)")
    generic.add_argument("--uri_column", default="uri")
    generic.add_argument("--labels_column", default="labels", help="a list, or a string split by --label_delimiter")
    generic.add_argument("--id_column", default=None, help="default: the URI as written in the manifest")
    generic.add_argument("--label_delimiter", default="|")
    planet = p.add_argument_group("planet and voc")
    planet.add_argument("--image_root", default=None,
                        help="Planet image folder, gs:// or http(s):// prefix "
                             "(default: train-jpg/ next to the manifest)")
    planet.add_argument("--image_ext", default="jpg", help="Planet image extension (jpg or tif)")
    planet.add_argument("--voc_image_set", default=None,
                        help="VOC: use ImageSets/Main/<set>.txt (e.g. train, val, trainval); default all annotations")
    labels = p.add_argument_group("labels")
    labels.add_argument("--min_label_count", type=int, default=None,
                        help="keep labels used by at least this many rows (default 1)")
    labels.add_argument("--max_labels", type=int, default=None, help="keep at most the N most frequent labels")
    labels.add_argument("--vocab_file", default=None,
                        help="a labels.txt fixing the label order (e.g. a production model's); "
                             "unknown labels are ignored")
    labels.add_argument("--unlabeled", choices=("reject", "keep"), default="reject",
                        help="rows with no known label: reject them, or keep them with all-zero labels")
    img = p.add_argument_group("images")
    img.add_argument("--image_size", type=int, default=_IMAGE_DEFAULTS.size)
    img.add_argument("--resize_policy", choices=images.RESIZE_POLICIES, default=_IMAGE_DEFAULTS.policy)
    img.add_argument("--image_format", choices=images.OUTPUT_FORMATS, default=_IMAGE_DEFAULTS.output_format)
    img.add_argument("--jpeg_quality", type=int, default=_IMAGE_DEFAULTS.jpeg_quality)
    img.add_argument("--max_image_pixels", type=int, default=_IMAGE_DEFAULTS.max_pixels,
                     help="refuse images with more pixels (decompression bombs)")
    net = p.add_argument_group("fetching")
    net.add_argument("--fetch_timeout_s", type=float, default=_FETCH_DEFAULTS.timeout_s)
    net.add_argument("--max_download_bytes", type=int, default=_FETCH_DEFAULTS.max_bytes)
    net.add_argument("--max_redirects", type=int, default=_FETCH_DEFAULTS.max_redirects)
    net.add_argument("--fetch_retries", type=int, default=_FETCH_DEFAULTS.retries)
    net.add_argument("--fetch_backoff_s", type=float, default=_FETCH_DEFAULTS.backoff_s,
                     help="first retry back-off, doubled per retry")
    net.add_argument("--fetch_concurrency", type=int, default=16, help="parallel downloads per worker thread")
    net.add_argument("--allow_loopback", action="store_true", help="allow image URLs on 127.0.0.0/8 and ::1")
    net.add_argument("--allow_link_local", action="store_true",
                     help="allow link-local addresses and cloud metadata endpoints (dangerous)")
    net.add_argument("--allow_local_files", action="store_true",
                     help="allow absolute local paths and file:// URIs outside the manifest's folder")
    out = p.add_argument_group("splits and shards")
    out.add_argument("--val_fraction", type=float, default=0.1)
    out.add_argument("--test_fraction", type=float, default=0.1)
    out.add_argument("--target_shard_mb", type=float, default=64.0, help="target shard size in MiB (uncompressed)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    return build_parser().parse_known_args(argv)


def _check_flags(args: argparse.Namespace) -> None:
    try:
        splits.check_fractions(args.val_fraction, args.test_fraction)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.vocab_file and (args.min_label_count is not None or args.max_labels is not None):
        # A warning, not an error: a scheduler (pipelines.retrain) adds --vocab_file to the user's flags.
        _LOG.warning("--vocab_file fixes the labels; ignoring --min_label_count and --max_labels")
    if args.min_label_count is not None and args.min_label_count < 1:
        raise UsageError(f"--min_label_count must be >= 1, got {args.min_label_count}")
    if args.max_labels is not None and args.max_labels < 1:
        raise UsageError(f"--max_labels must be >= 1, got {args.max_labels}")
    if args.target_shard_mb <= 0 or args.fetch_concurrency < 1:
        raise UsageError("--target_shard_mb must be > 0 and --fetch_concurrency >= 1")


def _options(args: argparse.Namespace, num_labels: int = 0) -> ExampleOptions:
    try:
        fetch_options = fetch.FetchOptions(
            timeout_s=args.fetch_timeout_s, max_bytes=args.max_download_bytes, max_redirects=args.max_redirects,
            retries=args.fetch_retries, backoff_s=args.fetch_backoff_s, allow_loopback=args.allow_loopback,
            allow_link_local=args.allow_link_local, allow_local_files=args.allow_local_files)
        image_options = images.ImageOptions(size=args.image_size, policy=args.resize_policy,
                                            output_format=args.image_format, jpeg_quality=args.jpeg_quality,
                                            max_pixels=args.max_image_pixels)
    except ValueError as err:  # the option classes name the field; say it as a flag problem
        raise UsageError(f"invalid flag value: {err}") from None
    return ExampleOptions(fetch_options, image_options, args.fetch_concurrency, args.val_fraction,
                          args.test_fraction, num_labels)


def _runs_locally(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner
    return runner is None or str(runner).rsplit(".", 1)[-1] in _LOCAL_RUNNERS


def _work_dir(options: PipelineOptions, local: bool, output: str) -> str:
    """Scratch space for the analysis pass, readable by every worker."""
    if local:
        return tempfile.mkdtemp(prefix="tagbeam-")
    if "://" not in output:
        raise UsageError(f"--output {output} is a local folder, which workers of a remote --runner cannot write; "
                         "use a gs:// folder")
    temp_location = options.view_as(GoogleCloudOptions).temp_location
    if not temp_location:
        raise UsageError("--temp_location is required with a remote --runner (the analysis pass stages files there)")
    return dataset_info.join(temp_location, f"tagbeam-{uuid.uuid4().hex}")


def _read(p: beam.Pipeline, spec: manifests.ManifestSpec) -> tuple[Any, Any]:
    parsed = p | "ReadManifest" >> manifests.ReadManifest(spec)
    unique = parsed.rows | "DropDuplicateIds" >> manifests.DropDuplicateIds()
    return parsed, unique


def analyze(args: argparse.Namespace, spec: manifests.ManifestSpec, options: PipelineOptions,
            work_dir: str, transform_dir: str) -> tuple[list[str], dict[str, Any]]:
    """The analysis pass: returns (labels in vocabulary order, label stats)."""
    fixed = vocabulary.read_vocab_file(args.vocab_file) if args.vocab_file else None
    vocab_path = None
    if fixed:
        # A normalized copy (no blank lines or padding) that every worker can read as a TFT asset.
        vocab_path = dataset_info.write_bytes(dataset_info.join(work_dir, "vocab.txt"),
                                              "".join(f"{label}\n" for label in fixed).encode("utf-8"))
    stats_path = dataset_info.join(work_dir, "label_stats.json")
    min_count = args.min_label_count or 1
    with beam.Pipeline(options=options) as p:
        parsed, unique = _read(p, spec)
        rejected = (parsed.rejected, unique.rejected) | "AllRejected" >> beam.Flatten()
        _ = (unique.rows, rejected) | "LabelStats" >> vocabulary.WriteLabelStats(stats_path)
        _ = unique.rows | "Vocabulary" >> vocabulary.AnalyzeVocabulary(
            transform_dir, dataset_info.join(work_dir, "tft_tmp"), min_count, args.max_labels, vocab_path)
    stats = dataset_info.read_json(stats_path)
    if stats["rows"] == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats["rejected_by_reason"].items()))
        raise UsageError(f"--input {args.input}: no usable row among {stats['rejected']} ({reasons}); "
                         "check the manifest's URI and id columns")
    labels = fixed or vocabulary.learned_labels(transform_dir, stats["label_counts"], min_count)
    return labels, stats


def build_main(p: beam.Pipeline, spec: manifests.ManifestSpec, labels: Sequence[str], example_options: ExampleOptions,
               args: argparse.Namespace, options_record: dict[str, Any]) -> None:
    """The main pass, ending in dataset.json."""
    parsed, unique = _read(p, spec)
    labeled = unique.rows | "EncodeLabels" >> beam.ParDo(
        EncodeLabels(labels, args.unlabeled == "keep")).with_outputs(REJECTED_TAG, main="rows")
    encoded = (labeled.rows
               | "Batch" >> beam.BatchElements(min_batch_size=8, max_batch_size=64)
               | "FetchAndEncode" >> beam.ParDo(FetchAndEncode(example_options)).with_outputs(
                   REJECTED_TAG, main="rows"))
    shards = (encoded.rows
              | "Progress" >> beam.ParDo(LogProgress("images encoded"))
              | "WriteShards" >> WriteShards(args.output, len(labels), int(args.target_shard_mb * 2**20)))
    rejected = ((parsed.rejected, unique.rejected, labeled.rejected, encoded.rejected)
                | "AllRejected" >> beam.Flatten())
    rejected_files = (rejected
                      | "ToJson" >> beam.Map(lambda r: json.dumps(r, ensure_ascii=False))
                      | "WriteRejected" >> beam.io.WriteToText(
                          dataset_info.join(args.output, dataset_info.REJECTED_PREFIX), file_name_suffix=".jsonl",
                          shard_name_template="-SSSSS-of-NNNNN"))
    input_rows = ((parsed.rows, parsed.rejected)
                  | "AllInputRows" >> beam.Flatten()
                  | "CountInputRows" >> beam.combiners.Count.Globally())
    by_reason = (rejected
                 | "Reason" >> beam.Map(lambda r: f"{r['stage']}:{r['reason']}")
                 | "CountByReason" >> beam.combiners.Count.PerElement())
    _ = ({"input_rows": input_rows, "rejected_by_reason": by_reason, "shards": shards,
          "rejected_files": rejected_files}
         | "CommitDataset" >> dataset_info.CommitDataset(args.output, labels, options_record))


def _counters(result: Any) -> dict[str, int]:
    """Committed tagbeam counters, where the runner reports them (for the summary only)."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        found = result.metrics().query(MetricsFilter().with_namespace(manifests.COUNTER_NAMESPACE))["counters"]
    except Exception:  # noqa: BLE001 - some runners do not implement metrics queries
        return {}
    totals: dict[str, int] = {}
    for counter in found:
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + (counter.committed or 0)
    return totals


def run(args: argparse.Namespace, pipeline_args: Sequence[str]) -> dict[str, Any]:
    """Runs both passes; returns the content of dataset.json. Raises UsageError for user mistakes."""
    start = time.monotonic()
    _check_flags(args)
    _options(args)  # validates the image and fetch flags before anything runs
    spec = manifests.resolve_spec(args.input, args.format, uri_column=args.uri_column,
                                  labels_column=args.labels_column, id_column=args.id_column,
                                  label_delimiter=args.label_delimiter, image_root=args.image_root,
                                  image_ext=args.image_ext, voc_image_set=args.voc_image_set)
    options = cli.pipeline_options(pipeline_args)
    local = _runs_locally(options)
    work_dir = _work_dir(options, local, args.output)
    transform_dir = dataset_info.join(args.output, dataset_info.TRANSFORM_OUTPUT)
    # TFT writes through tf.io, which reaches only real GCS; a local run stages its output locally
    # and copies it with Beam's FileSystems, which also serve GCS emulators and other stores.
    staged = local and "://" in args.output
    try:
        dataset_info.prepare_output(args.output, args.overwrite)
        _LOG.info("analysis pass: %s manifest %s (%d file(s))", spec.format, args.input, len(spec.files))
        analysis_dir = dataset_info.join(work_dir, dataset_info.TRANSFORM_OUTPUT) if staged else transform_dir
        labels, stats = analyze(args, spec, options, work_dir, analysis_dir)
        if staged:
            dataset_info.copy_tree(analysis_dir, transform_dir)
        _LOG.info("analysis pass done in %.1f s: %d rows kept, %d labels", time.monotonic() - start,
                  stats["rows"], len(labels))

        main_start = time.monotonic()
        record = {**vars(args), "format": spec.format, "min_label_count": args.min_label_count or 1,
                  "runner": options.view_as(StandardOptions).runner or "DirectRunner"}
        p = beam.Pipeline(options=options)
        build_main(p, spec, labels, _options(args, len(labels)), args, record)
        result = p.run()
        result.wait_until_finish()
        main_seconds = time.monotonic() - main_start
    finally:
        dataset_info.remove_tree(work_dir)
    dataset_info.remove_temporaries(args.output)
    info = dataset_info.read_json(dataset_info.join(args.output, dataset_info.DATASET_JSON))
    print(dataset_info.summary_table(info, main_seconds, _counters(result)))
    print(f"[preprocess] wrote {args.output} in {time.monotonic() - start:.1f} s "
          f"(analysis {main_start - start:.1f} s, main pass {main_seconds:.1f} s)")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
