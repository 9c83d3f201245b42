"""Batch prediction with an exported model over a manifest of images, with Apache Beam.

    python -m pipelines.predict --input new.csv --model model_dir/export --output predictions/ \\
        [--runner DataflowRunner --project P --region R --temp_location gs://b/tmp --setup_file ./setup.py]

Reads the same manifest formats as preprocessing, fetches and validates images with the same code,
runs the SavedModel's own serving signature through Beam's RunInference (so the probabilities are
exactly what the served model returns for the same bytes), and writes one row per image
(`predictions-*.csv|jsonl|parquet`), a dead letter (`rejected-*.jsonl`) and `summary.json`, whose
counts reconcile: input_rows == predicted + rejected.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from pipelines import cli, dataset_info, fetch, images, manifests
from pipelines.examples import fetch_rows
from pipelines.manifests import REJECTED_TAG, Row, UsageError, count, reject_row

_LOG = logging.getLogger("pipelines.predict")
OUTPUT_FORMATS = ("csv", "jsonl", "parquet")
SUMMARY_JSON = "summary.json"
PREDICTIONS_PREFIX = "predictions"
# Formats the serving signature decodes itself; others are converted (losslessly) to PNG first.
_SERVABLE_FORMATS = ("JPEG", "PNG", "GIF", "BMP")
_FETCH_DEFAULTS = fetch.FetchOptions()


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m pipelines.predict", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                epilog="Unknown arguments are passed to Beam's PipelineOptions.")
    p.add_argument("--input", required=True, help="manifest file, glob or gs:// URI (as for pipelines.preprocess)")
    p.add_argument("--format", default="auto", choices=("auto", *manifests.FORMATS))
    p.add_argument("--model", required=True,
                   help="exported SavedModel: a version folder, an export base (the newest numeric version is "
                        "used), or a retraining workspace (its champion.json)")
    p.add_argument("--output", required=True, help="folder for predictions-*, rejected-*.jsonl and summary.json")
    p.add_argument("--output_format", choices=OUTPUT_FORMATS, default="csv")
    p.add_argument("--overwrite", action="store_true", help="replace predictions already in --output")
    p.add_argument("--batch_size", type=int, default=32, help="images per model call")
    generic = p.add_argument_group("manifest columns and layout (as for pipelines.preprocess)")
    generic.add_argument("--uri_column", default="uri")
    generic.add_argument("--id_column", default=None)
    generic.add_argument("--image_root", default=None)
    generic.add_argument("--image_ext", default="jpg")
    generic.add_argument("--voc_image_set", default=None)
    net = p.add_argument_group("fetching (as for pipelines.preprocess)")
    net.add_argument("--max_image_pixels", type=int, default=images.ImageOptions().max_pixels)
    net.add_argument("--fetch_timeout_s", type=float, default=_FETCH_DEFAULTS.timeout_s)
    net.add_argument("--max_download_bytes", type=int, default=_FETCH_DEFAULTS.max_bytes)
    net.add_argument("--max_redirects", type=int, default=_FETCH_DEFAULTS.max_redirects)
    net.add_argument("--fetch_retries", type=int, default=_FETCH_DEFAULTS.retries)
    net.add_argument("--fetch_concurrency", type=int, default=16)
    net.add_argument("--allow_loopback", action="store_true")
    net.add_argument("--allow_link_local", action="store_true")
    net.add_argument("--allow_local_files", action="store_true")
    return p


def resolve_model(path: str) -> str:
    """The SavedModel version folder that `--model` designates (see its help)."""
    path = path.rstrip("/")
    champion = dataset_info.join(path, "champion.json")
    if FileSystems.exists(champion):
        return dataset_info.read_json(champion)["export_path"]
    if FileSystems.exists(dataset_info.join(path, "saved_model.pb")):
        return path
    versions = []
    try:
        for meta in FileSystems.match([dataset_info.join(path, "*/saved_model.pb")])[0].metadata_list:
            name = meta.path.rstrip("/").split("/")[-2]
            if name.isdigit():
                versions.append((int(name), meta.path[: -len("/saved_model.pb")]))
    except Exception:  # noqa: BLE001 - BeamIOError when the folder does not exist
        pass
    if not versions:
        raise UsageError(f"--model {path}: no SavedModel there (no saved_model.pb, no numeric version folder, "
                         "no champion.json); pass trainer.task's <model_dir>/export or a version folder")
    return max(versions)[1]


def read_model_labels(model_path: str) -> list[str]:
    with FileSystems.open(dataset_info.join(model_path, "assets/labels.txt")) as f:
        return [line.strip() for line in f.read().decode("utf-8").splitlines() if line.strip()]


class FetchAndCheck(beam.DoFn):
    """A batch of rows -> (Row, bytes the model can decode); failures -> rejected.

    Each image is fully decoded once with Pillow (the pipeline's decoder, with its pixel limit),
    so an unreadable image costs only its row; one bad image in a model batch would fail the batch.
    """

    def __init__(self, options: fetch.FetchOptions, concurrency: int, max_pixels: int) -> None:
        self._options, self._concurrency, self._max_pixels = options, concurrency, max_pixels

    def process(self, batch: Sequence[Row]) -> Iterator[Any]:
        fetched = fetch_rows(batch, self._options, self._concurrency)
        for row, data in zip(batch, fetched):
            if isinstance(data, fetch.FetchError):
                count(f"rejected_fetch_{data.reason}")
                yield beam.pvalue.TaggedOutput(REJECTED_TAG, reject_row(row, "fetch", data.reason, data.detail))
                continue
            try:
                image = images.to_rgb(data, self._max_pixels)
            except images.ImageError as err:
                count(f"rejected_decode_{err.reason}")
                yield beam.pvalue.TaggedOutput(REJECTED_TAG, reject_row(row, "decode", err.reason, err.detail))
                continue
            if _image_format(data) not in _SERVABLE_FORMATS:
                # TF cannot decode WebP/TIFF: hand the model lossless pixels instead of the original bytes.
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data = buffer.getvalue()
                count("images_converted_to_png")
            count("images_checked")
            yield row, data


def _image_format(data: bytes) -> str | None:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.format


class SavedModelHandler(ModelHandler[bytes, dict, Any]):
    """Runs a SavedModel's `serving_default` on encoded image bytes.

    Beam's stock TensorFlow handler feeds numpy/tensors to a Keras model; this signature takes a
    batch of strings and returns named outputs, so a small handler of our own fits it exactly.
    """

    def __init__(self, model_path: str, batch_size: int) -> None:
        super().__init__()
        self._model_path, self._batch_size = model_path, batch_size

    def load_model(self) -> Any:
        import tensorflow as tf

        return tf.saved_model.load(self._model_path).signatures["serving_default"]

    def run_inference(self, batch: Sequence[bytes], model: Any, inference_args: dict | None = None
                      ) -> Iterable[PredictionResult]:
        import tensorflow as tf

        outputs = model(image_bytes=tf.constant(list(batch), dtype=tf.string))
        probabilities = outputs["probabilities"].numpy()
        predicted = outputs["predicted"].numpy()
        return [PredictionResult(example, {"probabilities": p, "predicted": k})
                for example, p, k in zip(batch, probabilities, predicted)]

    def batch_elements_kwargs(self) -> dict[str, int]:
        return {"min_batch_size": 1, "max_batch_size": self._batch_size}

    def get_metrics_namespace(self) -> str:
        return "tagbeam_inference"


def to_record(item: tuple[Row, PredictionResult], labels: Sequence[str]) -> dict[str, Any]:
    """One output row: id, uri, predicted label names, and a probability per label."""
    row, result = item
    probabilities = result.inference["probabilities"]
    chosen = [label for label, k in zip(labels, result.inference["predicted"]) if k]
    count("rows_predicted")
    return {"id": row.id, "uri": row.uri, "predicted_labels": chosen,
            "probabilities": {label: float(p) for label, p in zip(labels, probabilities)}}


def csv_line(record: dict[str, Any], labels: Sequence[str]) -> str:
    import csv

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(
        [record["id"], record["uri"], "|".join(record["predicted_labels"])]
        + [f"{record['probabilities'][label]:.6f}" for label in labels])
    return buffer.getvalue()


def csv_header(labels: Sequence[str]) -> str:
    import csv

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(["id", "uri", "predicted_labels", *labels])
    return buffer.getvalue()


def _write_predictions(records: beam.PCollection, output: str, output_format: str, labels: Sequence[str]
                       ) -> beam.PCollection:
    prefix = dataset_info.join(output, PREDICTIONS_PREFIX)
    shard = "-SSSSS-of-NNNNN"
    if output_format == "jsonl":
        return (records | "ToJson" >> beam.Map(lambda r: json.dumps(r, ensure_ascii=False))
                | "WriteJsonl" >> beam.io.WriteToText(prefix, file_name_suffix=".jsonl", shard_name_template=shard))
    if output_format == "csv":
        return (records | "ToCsv" >> beam.Map(csv_line, labels)
                | "WriteCsv" >> beam.io.WriteToText(prefix, file_name_suffix=".csv", shard_name_template=shard,
                                                    header=csv_header(labels)))
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("uri", pa.string()), ("predicted_labels", pa.list_(pa.string())),
                        *[(label, pa.float32()) for label in labels]])
    return (records
            | "Flatten" >> beam.Map(lambda r: {"id": r["id"], "uri": r["uri"],
                                               "predicted_labels": r["predicted_labels"], **r["probabilities"]})
            | "WriteParquet" >> beam.io.WriteToParquet(prefix, schema, file_name_suffix=".parquet",
                                                       shard_name_template=shard))


def commit_summary(_: Any, *, output: str, model: str, labels: Sequence[str], options: dict[str, Any],
                   input_rows: int, predicted: int, rejected_by_reason: dict[str, int]) -> dict[str, Any]:
    rejected = sum(rejected_by_reason.values())
    if input_rows != predicted + rejected:
        raise dataset_info.InvariantError(
            f"input_rows {input_rows} != predicted {predicted} + rejected {rejected}: rows were lost or duplicated")
    summary = {"model": model, "labels": list(labels), "input_rows": input_rows, "predicted": predicted,
               "rejected": rejected, "rejected_by_reason": dict(sorted(rejected_by_reason.items())),
               "options": options}
    dataset_info.write_json(dataset_info.join(output, SUMMARY_JSON), summary)
    return summary


def build(p: beam.Pipeline, spec: manifests.ManifestSpec, model_path: str, labels: Sequence[str],
          args: argparse.Namespace) -> None:
    fetch_options = fetch.FetchOptions(
        timeout_s=args.fetch_timeout_s, max_bytes=args.max_download_bytes, max_redirects=args.max_redirects,
        retries=args.fetch_retries, allow_loopback=args.allow_loopback, allow_link_local=args.allow_link_local,
        allow_local_files=args.allow_local_files)
    parsed = p | "ReadManifest" >> manifests.ReadManifest(spec)
    unique = parsed.rows | "DropDuplicateIds" >> manifests.DropDuplicateIds()
    checked = (unique.rows
               | "Batch" >> beam.BatchElements(min_batch_size=8, max_batch_size=64)
               | "FetchAndCheck" >> beam.ParDo(FetchAndCheck(fetch_options, args.fetch_concurrency,
                                                             args.max_image_pixels)
                                               ).with_outputs(REJECTED_TAG, main="rows"))
    # The Row itself is the key: it rides through RunInference untouched, so no join is needed.
    records = (checked.rows
               | "RunInference" >> RunInference(KeyedModelHandler(SavedModelHandler(model_path, args.batch_size)))
               | "ToRecord" >> beam.Map(to_record, labels))
    _ = _write_predictions(records, args.output, args.output_format, labels)
    rejected = (parsed.rejected, unique.rejected, checked.rejected) | "AllRejected" >> beam.Flatten()
    _ = (rejected | "RejectedJson" >> beam.Map(lambda r: json.dumps(r, ensure_ascii=False))
         | "WriteRejected" >> beam.io.WriteToText(dataset_info.join(args.output, dataset_info.REJECTED_PREFIX),
                                                  file_name_suffix=".jsonl", shard_name_template="-SSSSS-of-NNNNN"))
    input_rows = ((parsed.rows, parsed.rejected) | "AllInputRows" >> beam.Flatten()
                  | "CountInput" >> beam.combiners.Count.Globally())
    predicted = records | "CountPredicted" >> beam.combiners.Count.Globally()
    by_reason = (rejected | "Reason" >> beam.Map(lambda r: f"{r['stage']}:{r['reason']}")
                 | "CountByReason" >> beam.combiners.Count.PerElement())
    _ = (p | "Once" >> beam.Create([None])
         | "Summary" >> beam.Map(commit_summary, output=args.output, model=model_path, labels=list(labels),
                                 options=vars(args), input_rows=beam.pvalue.AsSingleton(input_rows),
                                 predicted=beam.pvalue.AsSingleton(predicted),
                                 rejected_by_reason=beam.pvalue.AsDict(by_reason)))


def prepare_output(output: str, overwrite: bool) -> None:
    patterns = (SUMMARY_JSON, f"{PREDICTIONS_PREFIX}-*", f"{dataset_info.REJECTED_PREFIX}-*.jsonl")
    existing = [m.path for pattern in patterns for m in _match(dataset_info.join(output, pattern))]
    if existing and not overwrite:
        raise UsageError(f"--output {output} already holds predictions ({len(existing)} files); "
                         "pass --overwrite to replace them or choose another folder")
    if existing:
        FileSystems.delete(existing)


def _match(pattern: str) -> list[Any]:
    try:
        return FileSystems.match([pattern])[0].metadata_list
    except Exception:  # noqa: BLE001 - BeamIOError when the folder does not exist
        return []


def run(args: argparse.Namespace, pipeline_args: Sequence[str]) -> dict[str, Any]:
    start = time.monotonic()
    if args.batch_size < 1 or args.fetch_concurrency < 1:
        raise UsageError("--batch_size and --fetch_concurrency must be >= 1")
    model_path = resolve_model(args.model)
    labels = read_model_labels(model_path)
    spec = manifests.resolve_spec(args.input, args.format, uri_column=args.uri_column,
                                  labels_column=None, id_column=args.id_column, image_root=args.image_root,
                                  image_ext=args.image_ext, voc_image_set=args.voc_image_set)
    prepare_output(args.output, args.overwrite)
    with beam.Pipeline(options=cli.pipeline_options(pipeline_args)) as p:
        build(p, spec, model_path, labels, args)
    summary = dataset_info.read_json(dataset_info.join(args.output, SUMMARY_JSON))
    seconds = time.monotonic() - start
    print(f"[predict] {summary['predicted']} of {summary['input_rows']} rows predicted with {model_path}, "
          f"{summary['rejected']} rejected {summary['rejected_by_reason'] or ''} in {seconds:.1f} s "
          f"({summary['predicted'] / max(seconds, 1e-9):.1f} images/s); output {args.output}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
