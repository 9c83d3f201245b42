"""Batch prediction with an exported model over a manifest of images, with Apache Beam.

    python -m pipelines.predict --input new.csv --model model_dir/export --output predictions/ \\
        [--runner DataflowRunner --project P --region R --temp_location gs://b/tmp --setup_file ./setup.py]

Reads the same manifest formats as preprocessing, fetches images with the same code and turns each
into exactly the bytes a training example holds with the pipeline's own image code (the export
records how its dataset stored images), runs the export's stored-images signature - the model on
those pixels as training decoded them - through Beam's RunInference, and writes one row per image
(`predictions-*.csv|jsonl|parquet`), a dead letter (`rejected-*.jsonl`) and `summary.json`, whose
counts reconcile: input_rows == predicted + rejected.
"""
from __future__ import annotations

import dataclasses
import functools
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

from pipelines import cli, dataset_info, fetch, images, manifests, predict_report, runners
from pipelines.examples import decoded_or_rejection, fetch_rows
from pipelines.fetch import FetchOptions
from pipelines.images import ImageOptions
from pipelines.manifests import ManifestOptions, Row
from pipelines.options import PREDICT, OutputOptions, PredictOptions
from pipelines.outcomes import REJECTED_TAG, WriteRejected, count, reject_row, rejected
from tagbeam import console, flags, storage
from tagbeam import export as model_files
from tagbeam.dataset import REJECTED_PREFIX, REJECTED_SUFFIX, SHARD_TEMPLATE, Rejection, StoredImages
from tagbeam.flags import UsageError
from tagbeam.workspace import StateError, Workspace

_LOG = logging.getLogger("pipelines.predict")
ENTRY_POINT = "pipelines.predict"
SUMMARY_JSON = "summary.json"
PREDICTIONS_PREFIX = "predictions"


@dataclasses.dataclass(frozen=True)
class PredictJob:
    """The entry point's option groups. Of the image options only the decoding bounds apply (the
    model's export fixes the rest): the options tagged PREDICT. A manifest's labels, when it has
    them, are scored against the predictions (pipelines/predict_report.py)."""

    manifest: ManifestOptions
    output: OutputOptions
    predict: PredictOptions
    fetch: FetchOptions
    image: ImageOptions = flags.part(only_tagged=PREDICT)
    flags: dict[str, Any]


def build_parser() -> flags.Parser:
    p = flags.Parser(prog=f"python -m {ENTRY_POINT}", description=__doc__.split("\n\n")[0],
                     epilog="Any other argument must be one of Beam's pipeline options (--runner, --project, ...).")
    flags.add_job_options(p, PredictJob)
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[PredictJob, list[str]]:
    parser = build_parser()
    namespace, beam_args = flags.parse_with_beam(parser, argv, ENTRY_POINT)
    try:
        job = PredictJob(**flags.build_parts(PredictJob, namespace), flags=dict(vars(namespace)))
    except UsageError as err:
        parser.error(str(err))
    return job, beam_args


def check_model(model_path: str) -> list[str]:
    """The export's labels, after loading it once here: a broken export is one `error:` line before
    any work, not a traceback from every worker that tries to load it."""
    import tensorflow as tf

    try:
        labels = model_files.read_labels(model_path)
        signatures = tf.saved_model.load(model_path).signatures
    except Exception as err:  # noqa: BLE001 - a corrupt saved_model.pb raises whatever its parser raises
        raise UsageError(f"--model {model_path} cannot be loaded ({type(err).__name__}: {str(err)[:200]}); "
                         "export it again with `python -m trainer.task`") from None
    if model_files.SIGNATURE_NAME not in signatures:
        raise UsageError(f"--model {model_path} has no {model_files.SIGNATURE_NAME} signature: not an export of "
                         "`python -m trainer.task`")
    return labels


def resolve_model(path: str) -> str:
    """The SavedModel version folder that `--model` designates (see its help)."""
    path = path.rstrip("/")
    try:
        champion = Workspace(path).champion()
    except StateError as err:
        raise UsageError(f"--model {path}: {err}") from None
    if champion:
        return champion.export_path
    if storage.exists(storage.join(path, model_files.SAVED_MODEL_PB)):
        return path
    newest = model_files.newest_version(path)
    if newest is None:
        raise UsageError(f"--model {path}: no SavedModel there (no saved_model.pb, no numeric version folder, "
                         "no champion.json); pass trainer.task's <model_dir>/export or a version folder")
    return newest


class FetchAndCheck(beam.DoFn):
    """A batch of rows -> (Row, image bytes for the model); failures -> rejected.

    With `stored` (the export's stored_images.json), each image goes through the pipeline's own
    code (pipelines.images.process: decode, orientation, colour, bands and bit depth, resize,
    encoding) into exactly the bytes the training examples hold, for the export's stored-images
    signature; a row is rejected with the stage and reason preprocessing gives it. Without it (an
    export written before it was recorded) each image is decoded with the pipeline's decoder and
    handed to serving_default losslessly as PNG. An unreadable image costs only its row: one bad
    image in a model batch would fail the batch.
    """

    def __init__(self, options: fetch.FetchOptions, limits: ImageOptions, stored: StoredImages | None) -> None:
        self._options = options
        self._image_options = None if stored is None else limits.storing(stored)
        self._limits = limits

    def _model_input(self, data: bytes) -> bytes:
        if self._image_options is not None:
            return images.process(data, self._image_options)
        buffer = io.BytesIO()
        images.to_rgb(data, self._limits).save(buffer, format="PNG")
        return buffer.getvalue()

    def process(self, batch: Sequence[Row]) -> Iterator[Any]:
        fetched = fetch_rows(batch, self._options)
        for row, source in zip(batch, fetched, strict=True):
            if isinstance(source, fetch.FetchError):
                yield rejected(reject_row(row, "fetch", source.reason, source.detail))
                continue
            image = decoded_or_rejection(row, functools.partial(self._model_input, source.data))
            if isinstance(image, Rejection):
                yield rejected(image)
                continue
            count("images_checked")
            yield row, image


class SavedModelHandler(ModelHandler[bytes, dict, Any]):
    """Runs one of a SavedModel's signatures on encoded image bytes.

    Beam's stock TensorFlow handler feeds numpy/tensors to a Keras model; this signature takes a
    batch of strings and returns named outputs, so a small handler of our own fits it exactly.
    """

    def __init__(self, model_path: str, batch_size: int, signature: str) -> None:
        super().__init__()
        self._model_path, self._batch_size, self._signature = model_path, batch_size, signature

    def load_model(self) -> Any:
        import tensorflow as tf

        return tf.saved_model.load(self._model_path).signatures[self._signature]

    def run_inference(self, batch: Sequence[bytes], model: Any, inference_args: dict | None = None
                      ) -> Iterable[PredictionResult]:
        import tensorflow as tf

        outputs = model(**{model_files.INPUT_NAME: tf.constant(list(batch), dtype=tf.string)})
        probabilities = outputs[model_files.OUTPUT_PROBABILITIES].numpy()
        predicted = outputs[model_files.OUTPUT_PREDICTED].numpy()
        return [PredictionResult(example, {"probabilities": p, "predicted": k})
                for example, p, k in zip(batch, probabilities, predicted, strict=True)]

    def batch_elements_kwargs(self) -> dict[str, int]:
        return {"min_batch_size": 1, "max_batch_size": self._batch_size}

    def get_metrics_namespace(self) -> str:
        return "tagbeam_inference"


def to_record(item: tuple[Row, PredictionResult], labels: Sequence[str]) -> dict[str, Any]:
    """One output row: id, uri, predicted label names, and a probability per label."""
    row, result = item
    probabilities = result.inference["probabilities"]
    chosen = [label for label, k in zip(labels, result.inference["predicted"], strict=True) if k]
    count("rows_predicted")
    return {"id": row.id, "uri": row.uri, "predicted_labels": chosen,
            "probabilities": {label: float(p) for label, p in zip(labels, probabilities, strict=True)}}


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
    prefix = storage.join(output, PREDICTIONS_PREFIX)
    shard = SHARD_TEMPLATE
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
                   input_rows: int, predicted: int, rejected_by_reason: dict[str, int],
                   thresholds: Sequence[float] | None = None, **page: Any) -> dict[str, Any]:
    """summary.json (with the metrics when the manifest had labels), then summary.html from `page`,
    the side inputs of `_page_inputs` (none: no page)."""
    rejected = sum(rejected_by_reason.values())
    if input_rows != predicted + rejected:
        raise dataset_info.InvariantError(
            f"input_rows {input_rows} != predicted {predicted} + rejected {rejected}: rows were lost or duplicated")
    summary = {"model": model, "labels": list(labels), "input_rows": input_rows, "predicted": predicted,
               "rejected": rejected, "rejected_by_reason": dict(sorted(rejected_by_reason.items())),
               "options": options}
    section, note = None, "The manifest has no labels, so the predictions are not scored (no curves or error gallery)."
    if page.get("labelled"):
        summary["metrics"], section = predict_report.evaluation(page["labelled"], labels, thresholds, page["pictures"])
    elif "labelled" in page:
        note = "The manifest has labels, but no row was predicted: nothing to score."
    storage.write_json(storage.join(output, SUMMARY_JSON), summary)
    if thresholds is not None:
        try:
            predict_report.write_page(output, summary, labels, thresholds, page["histograms"], page["sample"],
                                      page["rejected_examples"], section, note)
        except Exception:  # noqa: BLE001 - the predictions are written; the page must not fail the job
            _LOG.exception("could not write %s in %s", predict_report.SUMMARY_HTML, output)
    return summary


def _page_inputs(inferred: beam.PCollection, rejections: beam.PCollection, labels: Sequence[str],
                 thresholds: Sequence[float], labelled: bool) -> dict[str, Any]:
    """What summary.html needs, gathered by bounded combiners (and every labelled row's scores)."""
    def scores(item: tuple[Row, PredictionResult]) -> tuple[Any, Any]:
        return item[1].inference["probabilities"], item[1].inference["predicted"]

    inputs = {
        "histograms": inferred | "Scores" >> beam.Map(scores).with_output_types(Any)
        | "Histograms" >> beam.CombineGlobally(predict_report.Histograms(len(labels))),
        "sample": inferred
        | "ForGallery" >> beam.Map(lambda i: (i[0].id, i[1].inference["probabilities"], i[1].example)).with_output_types(Any)
        | "Gallery" >> beam.combiners.Sample.FixedSizeGlobally(predict_report.GALLERY),
        "rejected_examples": rejections | "RejectedExample" >> beam.Map(lambda r: (r.key, f"row {r.row} ({r.id}): {r.detail}"))
        | "RejectedExamples" >> beam.combiners.Sample.FixedSizePerKey(predict_report.REJECTED_EXAMPLES),
    }
    if labelled:
        truth = inferred | "Truth" >> beam.Map(lambda i: (i[0].id, predict_report.multi_hot(i[0].labels, labels),
                                                          i[1].inference["probabilities"], i[1].example)
                                        ).with_output_types(Any)
        # Any: Beam's inference of a sliced tuple's type is wrong (and its coder then fails).
        inputs["labelled"] = (truth | "Labelled" >> beam.Map(lambda t: t[:3]).with_output_types(Any)
                              | "AllLabelled" >> beam.combiners.ToList())
        inputs["pictures"] = truth | "Pictures" >> beam.CombineGlobally(predict_report.GalleryCandidates(thresholds))
    return inputs


def build(p: beam.Pipeline, spec: manifests.ManifestSpec, model_path: str, labels: Sequence[str],
          job: PredictJob, labelled: bool = False) -> None:
    output = job.output.output
    stored = model_files.read_stored_images(model_path)
    if stored is None:
        _LOG.warning("%s records no %s (exported before it was recorded): images go through serving_default "
                     "instead of the pipeline's own preprocessing; re-export to predict exactly as training saw",
                     model_path, model_files.STORED_IMAGES_JSON)
    signature = model_files.SIGNATURE_NAME if stored is None else model_files.STORED_SIGNATURE_NAME
    parsed = p | "ReadManifest" >> manifests.ReadManifest(spec)
    unique = parsed.rows | "DropDuplicateIds" >> manifests.DropDuplicateIds()
    checked = (unique.rows
               | "Batch" >> beam.BatchElements(min_batch_size=8, max_batch_size=64)
               | "FetchAndCheck" >> beam.ParDo(FetchAndCheck(job.fetch, job.image, stored)
                                               ).with_outputs(REJECTED_TAG, main="rows"))
    # The Row itself is the key: it rides through RunInference untouched, so no join is needed.
    inferred = checked.rows | "RunInference" >> RunInference(
        KeyedModelHandler(SavedModelHandler(model_path, job.predict.batch_size, signature)))
    records = inferred | "ToRecord" >> beam.Map(to_record, labels)
    _ = _write_predictions(records, output, job.predict.output_format, labels)
    rejections = (parsed.rejected, unique.rejected, checked.rejected) | "Rejections" >> beam.Flatten()
    _ = (rejections,) | "DeadLetter" >> WriteRejected(output)
    input_rows = ((parsed.rows, parsed.rejected) | "AllInputRows" >> beam.Flatten()
                  | "CountInput" >> beam.combiners.Count.Globally())
    predicted = records | "CountPredicted" >> beam.combiners.Count.Globally()
    by_reason = (rejections | "Reason" >> beam.Map(lambda r: r.key)
                 | "CountByReason" >> beam.combiners.Count.PerElement())
    thresholds = model_files.read_thresholds(model_path)[1]
    page = _page_inputs(inferred, rejections, labels, thresholds, labelled)
    side = {name: (beam.pvalue.AsDict if name == "rejected_examples" else beam.pvalue.AsSingleton)(pcoll)
            for name, pcoll in page.items()}
    _ = (p | "Once" >> beam.Create([None])
         | "Summary" >> beam.Map(commit_summary, output=output, model=model_path, labels=list(labels),
                                 options=job.flags, input_rows=beam.pvalue.AsSingleton(input_rows),
                                 predicted=beam.pvalue.AsSingleton(predicted),
                                 rejected_by_reason=beam.pvalue.AsDict(by_reason), thresholds=thresholds, **side))


def resolve_spec(options: ManifestOptions) -> tuple[manifests.ManifestSpec, bool]:
    """The manifest's spec, and whether its rows carry labels to score: Planet, VOC and MovieGenre
    manifests always do; a generic one when it has the labels column (an explicit --labels_column
    that is missing is an error, as in preprocessing)."""
    try:
        return manifests.resolve_spec(options, with_labels=True), True
    except UsageError:
        default = {o.flag: o.default for o in flags.declared(ManifestOptions)}["labels_column"]
        if options.labels_column != default:
            raise
    spec = manifests.resolve_spec(options, with_labels=False)
    return spec, spec.format != "generic"


def prepare_output(output: str, overwrite: bool) -> None:
    patterns = (SUMMARY_JSON, f"{PREDICTIONS_PREFIX}-*", f"{REJECTED_PREFIX}-*{REJECTED_SUFFIX}")
    existing = [path for pattern in patterns for path in storage.match(storage.join(output, pattern))]
    if existing and not overwrite:
        raise UsageError(f"--output {output} already holds predictions ({len(existing)} files); "
                         "pass --overwrite to replace them or choose another folder")
    dataset_info.claim_output(output, overwrite, ENTRY_POINT)
    if existing:
        FileSystems.delete(existing)


def run(job: PredictJob, pipeline_args: Sequence[str]) -> dict[str, Any]:
    start = time.monotonic()
    output = job.output.output
    options = cli.pipeline_options(pipeline_args)
    runners.check_paths(options, {**runners.manifest_paths(job.manifest), "--model": job.predict.model,
                                  "--output": output})
    model_path = resolve_model(job.predict.model)
    labels = check_model(model_path)
    spec, labelled = resolve_spec(job.manifest)
    prepare_output(output, job.output.overwrite)
    with beam.Pipeline(options=options) as p:
        build(p, spec, model_path, labels, job, labelled)
    summary = storage.read_json(storage.join(output, SUMMARY_JSON))
    seconds = time.monotonic() - start
    print(f"[predict] {summary['predicted']} of {summary['input_rows']} rows predicted with {model_path}, "
          f"{summary['rejected']} rejected {summary['rejected_by_reason'] or ''} in {seconds:.1f} s "
          f"({summary['predicted'] / max(seconds, 1e-9):.1f} images/s); output {output}")
    if "metrics" in summary:
        m = summary["metrics"]["at_tuned"]
        print(f"[predict] against the manifest's labels at the model's thresholds: macro F1 {m['macro_f1']:.3f}, "
              f"micro F1 {m['micro_f1']:.3f} (summary.json \"metrics\")")
    print(f"[predict] page: {storage.join(output, predict_report.SUMMARY_HTML)}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(parse_args, run, argv)


if __name__ == "__main__":
    console.quiet_native_logs()
    sys.exit(main())
