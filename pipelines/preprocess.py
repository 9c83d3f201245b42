"""Builds the dataset directory of docs/dataset.md from an image manifest, with Apache Beam.

    python -m pipelines.preprocess --input MovieGenre.csv --output out/ --min_label_count 1000 \\
        [--runner DataflowRunner --project P --region R --temp_location gs://b/tmp --setup_file ./setup.py]

One Beam pipeline: parse, drop duplicate ids, count labels and compute the label vocabulary with
tensorflow-transform into <output>/transform_output/ (from the manifest alone, before any image is
fetched); then, with the labels as a side input, encode labels, fetch + decode + resize images in
batches, split by a hash of the id, write byte-sized TFRecord shards and the dead letter
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
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
)
from apache_beam.io.filesystems import FileSystems

from pipelines import cli, dataset_info, fetch, images, manifests, splits, vocabulary
from pipelines.examples import EncodeRows, ExampleOptions, plan_shards
from pipelines.manifests import REJECTED_TAG, UsageError
from pipelines.shards import SHARD_COMPRESSIONS, ShardPlan, WriteShards

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
    img.add_argument("--jpeg_subsampling", choices=images.JPEG_SUBSAMPLINGS, default=_IMAGE_DEFAULTS.jpeg_subsampling,
                     help="chroma subsampling of the stored JPEGs (default: %(default)s, as most source JPEGs are)")
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
    out.add_argument("--shard_compression", choices=SHARD_COMPRESSIONS, default="none",
                     help="none (default: the images are JPEG/PNG already, and every training read would pay to "
                          "inflate them) or gzip")
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


def _options(args: argparse.Namespace) -> ExampleOptions:
    try:
        fetch_options = fetch.FetchOptions(
            timeout_s=args.fetch_timeout_s, max_bytes=args.max_download_bytes, max_redirects=args.max_redirects,
            retries=args.fetch_retries, backoff_s=args.fetch_backoff_s, allow_loopback=args.allow_loopback,
            allow_link_local=args.allow_link_local, allow_local_files=args.allow_local_files)
        image_options = images.ImageOptions(size=args.image_size, policy=args.resize_policy,
                                            output_format=args.image_format, jpeg_quality=args.jpeg_quality,
                                            jpeg_subsampling=args.jpeg_subsampling,
                                            max_pixels=args.max_image_pixels)
    except ValueError as err:  # the option classes name the field; say it as a flag problem
        raise UsageError(f"invalid flag value: {err}") from None
    return ExampleOptions(fetch_options, image_options, args.fetch_concurrency, args.val_fraction,
                          args.test_fraction, args.unlabeled == "keep")


def _runs_locally(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner
    return runner is None or str(runner).rsplit(".", 1)[-1] in _LOCAL_RUNNERS


def _work_dir(options: PipelineOptions, local: bool, output: str) -> str:
    """Scratch space for the run (TFT's temporary files, the label stats), readable by every worker."""
    if local:
        return tempfile.mkdtemp(prefix="tagbeam-")
    if "://" not in output:
        raise UsageError(f"--output {output} is a local folder, which workers of a remote --runner cannot write; "
                         "use a gs:// folder")
    temp_location = options.view_as(GoogleCloudOptions).temp_location
    if not temp_location:
        raise UsageError("--temp_location is required with a remote --runner (the vocabulary analysis stages "
                         "files there)")
    return dataset_info.join(temp_location, f"tagbeam-{uuid.uuid4().hex}")


class _Paths(NamedTuple):
    work_dir: str
    transform_dir: str  # where dataset.json says the TFT output is
    analysis_dir: str  # where TFT writes it: transform_dir, or a local folder copied there (see run)
    vocab_path: str | None  # the normalized --vocab_file, a TFT asset

    @property
    def stats(self) -> str:
        return dataset_info.join(self.work_dir, "label_stats.json")


def _plan(_: Any, stats: dict[str, Any], fixed: Sequence[str] | None, paths: _Paths, options: ExampleOptions,
          target_bytes: int) -> ShardPlan:
    """The vocabulary and the shard plan, once TFT's output is in place (and published to --output,
    so that dataset.json, written later, never precedes it). Empty labels when the run cannot go on."""
    if paths.analysis_dir != paths.transform_dir:
        dataset_info.copy_tree(paths.analysis_dir, paths.transform_dir)
    labels = []
    if stats["rows"]:
        labels = list(fixed) if fixed else vocabulary.learned_labels(paths.analysis_dir, stats["label_counts"])
    return plan_shards(stats, labels, options, target_bytes)


def build(p: beam.Pipeline, spec: manifests.ManifestSpec, fixed: Sequence[str] | None, paths: _Paths,
          example_options: ExampleOptions, args: argparse.Namespace, options_record: dict[str, Any]) -> None:
    """The whole job, ending in dataset.json: parse and de-duplicate the manifest; label stats and
    the TFT vocabulary from the rows; then (with the labels and a shard plan as side inputs, so
    after them) fetch, encode and shard every row; the dead letter; the commit."""
    parsed = p | "ReadManifest" >> manifests.ReadManifest(spec)
    unique = parsed.rows | "DropDuplicateIds" >> manifests.DropDuplicateIds()
    stats = ((parsed.rows, unique.rows, (parsed.rejected, unique.rejected) | "EarlyRejected" >> beam.Flatten())
             | "ManifestStats" >> vocabulary.ManifestStats(paths.stats, args.val_fraction, args.test_fraction))
    analyzed = unique.rows | "Vocabulary" >> vocabulary.AnalyzeVocabulary(
        paths.analysis_dir, dataset_info.join(paths.work_dir, "tft_tmp"), args.min_label_count or 1,
        args.max_labels, paths.vocab_path)
    # Plan's main input is TFT's completion signal; stats is a side input. (A PCollection that is
    # both a side input upstream and a step's main input can make the local runner mis-order stages.)
    plan = analyzed | "Plan" >> beam.Map(_plan, beam.pvalue.AsSingleton(stats), fixed, paths, example_options,
                                         int(args.target_shard_mb * 2**20))
    encoded = (unique.rows
               | "Batch" >> beam.BatchElements(min_batch_size=8, max_batch_size=64)
               | "EncodeRows" >> beam.ParDo(EncodeRows(example_options), beam.pvalue.AsSingleton(plan)
                                            ).with_outputs(REJECTED_TAG, main="rows"))
    shards = encoded.rows | "WriteShards" >> WriteShards(args.output, plan, args.shard_compression)
    rejected_files = ((parsed.rejected, unique.rejected, encoded.rejected)
                      | "AllRejected" >> beam.Flatten()
                      | "ToJson" >> beam.Map(lambda r: json.dumps(r, ensure_ascii=False))
                      | "WriteRejected" >> beam.io.WriteToText(
                          dataset_info.join(args.output, dataset_info.REJECTED_PREFIX), file_name_suffix=".jsonl",
                          shard_name_template="-SSSSS-of-NNNNN"))
    _ = ({"plan": plan, "stats": stats, "shards": shards, "rejected_files": rejected_files}
         | "CommitDataset" >> dataset_info.CommitDataset(args.output, options_record))


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
    """Runs the job; returns the content of dataset.json. Raises UsageError for user mistakes."""
    start = time.monotonic()
    _check_flags(args)
    _options(args)  # validates the image and fetch flags before anything runs
    spec = manifests.resolve_spec(args.input, args.format, uri_column=args.uri_column,
                                  labels_column=args.labels_column, id_column=args.id_column,
                                  label_delimiter=args.label_delimiter, image_root=args.image_root,
                                  image_ext=args.image_ext, voc_image_set=args.voc_image_set)
    fixed = vocabulary.read_vocab_file(args.vocab_file) if args.vocab_file else None
    options = cli.pipeline_options(pipeline_args)
    local = _runs_locally(options)
    work_dir = _work_dir(options, local, args.output)
    transform_dir = dataset_info.join(args.output, dataset_info.TRANSFORM_OUTPUT)
    # TFT writes through tf.io, which reaches only real GCS; a local run stages its output locally
    # and copies it with Beam's FileSystems, which also serve GCS emulators and other stores.
    staged = local and "://" in args.output
    try:
        dataset_info.prepare_output(args.output, args.overwrite)
        vocab_path = None
        if fixed:
            # A normalized copy (no blank lines or padding) that every worker can read as a TFT asset.
            vocab_path = dataset_info.write_bytes(dataset_info.join(work_dir, "vocab.txt"),
                                                  "".join(f"{label}\n" for label in fixed).encode("utf-8"))
        paths = _Paths(work_dir, transform_dir,
                       dataset_info.join(work_dir, dataset_info.TRANSFORM_OUTPUT) if staged else transform_dir,
                       vocab_path)
        _LOG.info("%s manifest %s (%d file(s))", spec.format, args.input, len(spec.files))
        record = {**vars(args), "format": spec.format, "min_label_count": args.min_label_count or 1,
                  "runner": options.view_as(StandardOptions).runner or "DirectRunner"}
        p = beam.Pipeline(options=options)
        build(p, spec, fixed, paths, _options(args), args, record)
        built = time.monotonic()
        result = p.run()
        result.wait_until_finish()
        seconds = time.monotonic() - start
        info_path = dataset_info.join(args.output, dataset_info.DATASET_JSON)
        if not FileSystems.exists(info_path):  # the commit found no labels: say why
            stats = dataset_info.read_json(paths.stats)
            if not stats["rows"]:
                raise vocabulary.no_row_error(args.input, stats)
            raise vocabulary.no_label_error(stats["label_counts"], args.min_label_count or 1)
    finally:
        dataset_info.remove_tree(work_dir)
        dataset_info.remove_temporaries(args.output)  # run files can be as large as the dataset
    info = dataset_info.read_json(info_path)
    print(dataset_info.summary_table(info, seconds, _counters(result)))
    print(f"[preprocess] wrote {args.output} in {time.monotonic() - start:.1f} s "
          f"(pipeline construction {built - start:.1f} s)")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
