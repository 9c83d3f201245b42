"""Batch prediction: RunInference with the exported SavedModel over real sample posters."""
from __future__ import annotations

import csv
import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
import tf_keras

import sample_data
from pipelines import images, predict
from pipelines.images import ImageOptions
from sample_data.hostile import zero_tiff
from tagbeam.dataset import StoredImages
from trainer.evaluation import evaluate
from trainer.hub import hub
from trainer.model import NonEmptyBatch
from trainer.serving import export_model

from backbone_factory import write_backbone
from browser import load, screenshot

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def posters(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("samples")
    sample_data.build(root, posters=0, heldout_posters=24, chips=False)
    return str(root / "posters")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, posters) -> tuple[str, list[str]]:
    """A small but real servable: a hub.KerasLayer backbone + a dense head, exported by the trainer's code."""
    root = tmp_path_factory.mktemp("model")
    with open(os.path.join(posters, "MovieGenre-heldout.csv"), encoding="utf-8") as f:
        labels = sorted({g for row in csv.DictReader(f) for g in row["Genre"].split("|")})
    backbone = hub.KerasLayer(write_backbone(str(root / "backbone"), seed=1), trainable=False)
    images = tf_keras.Input([IMAGE_SIZE, IMAGE_SIZE, 3], dtype=tf.uint8)  # the export contract
    logits = tf_keras.layers.Dense(len(labels), kernel_initializer=tf_keras.initializers.RandomNormal(seed=2))(
        NonEmptyBatch(backbone)(images))
    model = tf_keras.Model(images, logits)
    thresholds = np.full(len(labels), 0.5, np.float32)
    export_model(model, str(root / "export"), labels, thresholds, StoredImages(IMAGE_SIZE, "png", "squash", 95, "4:2:0"),
                 version=1)
    return str(root / "export"), labels


def _with_bad_rows(posters: str, tmp_path) -> tuple[str, dict[str, str]]:
    """The held-out manifest plus rows that must end in the dead letter, with their reasons."""
    images = os.path.join(posters, "images")
    with open(os.path.join(images, os.listdir(images)[0]), "rb") as f:
        jpeg = f.read()
    bad = {"truncated.jpg": jpeg[: len(jpeg) // 3], "page.jpg": b"<html><body>Not found</body></html>",
           "huge.tif": zero_tiff((7000, 7000, 4), np.uint16)}  # 0.4 MB as a file, 392 MB decoded
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    with open(os.path.join(posters, "MovieGenre-heldout.csv"), encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    # This manifest lives elsewhere: its posters are given as absolute paths (needs --allow_local_files).
    body = [row[:-1] + [os.path.join(posters, row[-1])] for row in body]
    extra = [["9000001", "", "Cut", "5.0", "Drama", str(tmp_path / "truncated.jpg")],
             ["9000002", "", "Html", "5.0", "Drama", str(tmp_path / "page.jpg")],
             ["9000003", "", "Gone", "5.0", "Drama", str(tmp_path / "missing.jpg")],
             ["9000004", "", "No poster", "5.0", "Drama", ""],
             ["9000005", "", "Huge", "5.0", "Drama", str(tmp_path / "huge.tif")],
             ["9000006", "", "Bracket", "5.0", "Drama", "http://[::1"]]
    manifest = tmp_path / "MovieGenre.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *body, *extra])
    expected = {"9000001": "decode:truncated", "9000002": "decode:not_an_image", "9000003": "fetch:not_found",
                "9000004": "parse:missing_uri", "9000005": "decode:too_large_decoded", "9000006": "parse:bad_uri"}
    return str(manifest), expected


def test_predict_matches_the_saved_model_and_reconciles(posters, exported, tmp_path, browser):
    export_base, labels = exported
    manifest, expected_rejects = _with_bad_rows(posters, tmp_path)
    out = tmp_path / "out"
    code = predict.main(["--input", manifest, "--model", export_base, "--output", str(out),
                         "--allow_local_files", "--batch_size", "8"])
    assert code == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["input_rows"] == 24 + 6
    assert summary["predicted"] == 24
    assert summary["rejected"] == 6
    assert summary["model"].endswith("/1")

    rejected = {}
    for path in glob.glob(str(out / "rejected-*.jsonl")):
        for line in open(path, encoding="utf-8"):
            record = json.loads(line)
            rejected[record["id"]] = f"{record['stage']}:{record['reason']}"
    assert rejected == expected_rejects

    with open(glob.glob(str(out / "predictions-*.csv"))[0], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and len({r["id"] for r in rows}) == 24
    # Predict hands the model exactly the pixels a training example of the same image holds: the
    # pipeline's own preprocessing, then the stored-images signature (training's decoding).
    loaded = tf.saved_model.load(os.path.join(export_base, "1"))
    uris = [r["uri"] for r in rows]
    stored = [images.process(open(u, "rb").read(), ImageOptions(size=IMAGE_SIZE, output_format="png")) for u in uris]
    own = loaded.signatures["stored_images"](image_bytes=tf.constant(stored))
    ours = np.array([[float(r[label]) for label in labels] for r in rows])
    np.testing.assert_allclose(ours, own["probabilities"].numpy(), atol=1e-6)
    # Online serving reproduces that preprocessing with TF ops, closely but not bit for bit.
    online = loaded.signatures["serving_default"](image_bytes=tf.constant([open(u, "rb").read() for u in uris]))
    np.testing.assert_allclose(ours, online["probabilities"].numpy(), atol=0.02)
    for row, names in zip(rows, own["predicted_labels"].numpy(), strict=True):
        got = row["predicted_labels"].split("|") if row["predicted_labels"] else []
        assert got == [n.decode() for n in names if n]

    # The manifest's Genre labels are scored: metrics at the model's thresholds, from the predictions.
    with open(manifest, encoding="utf-8") as f:
        genres = {r["imdbId"]: r["Genre"].split("|") for r in csv.DictReader(f)}
    truth = np.array([[label in genres[r["id"]] for label in labels] for r in rows])
    metrics = evaluate(truth, ours.astype(np.float32), labels, np.full(len(labels), 0.5, np.float32), beta=1.0)
    assert summary["metrics"]["at_tuned"] == pytest.approx(metrics["at_tuned"], abs=1e-6)
    assert summary["metrics"]["macro_average_precision"] == pytest.approx(metrics["macro_average_precision"], abs=1e-6)

    # summary.html, as a person opens it.
    problems, requests = load(browser, str(out / "summary.html"))
    assert problems == [] and requests == []
    body = browser.find_element("tag name", "body").text
    assert "decode:truncated" in body and "9000001" in body  # rejected rows by reason, with examples
    assert len(browser.find_elements("css selector", "div.hist svg.histogram")) == len(labels)
    photos = browser.find_elements("css selector", "img.photo")
    assert len(photos) >= 24  # the sample of predictions, and the error gallery
    for image in photos:
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
    assert not browser.find_elements("css selector", ".missing")  # the combiner kept every gallery row's picture
    for k, label in enumerate(labels):
        curves = browser.find_elements("css selector", f"#label-{k} svg.pr-curve polyline")
        assert len(curves) == (1 if truth[:, k].any() else 0), label
    screenshot(browser, "predict-summary.png")


def test_predict_parquet_output_and_refuses_to_mix(posters, exported, tmp_path):
    export_base, labels = exported
    manifest = os.path.join(posters, "MovieGenre-heldout.csv")
    out = tmp_path / "out"
    args = ["--input", manifest, "--model", export_base, "--output", str(out), "--output_format", "parquet"]
    assert predict.main(args) == 0
    table = pq.read_table(glob.glob(str(out / "predictions-*.parquet"))[0])
    assert table.num_rows == 24
    assert table.column_names[:3] == ["id", "uri", "predicted_labels"] and table.column_names[3:] == labels
    assert predict.main(args) == 2  # existing predictions are not mixed into


def test_bad_model_path_is_a_clear_error(posters, tmp_path, capsys):
    code = predict.main(["--input", os.path.join(posters, "MovieGenre-heldout.csv"), "--model", str(tmp_path),
                         "--output", str(tmp_path / "out")])
    assert code == 2
    assert "--model" in capsys.readouterr().err


def test_a_corrupt_export_is_one_error_line_before_any_work(posters, exported, tmp_path, capsys):
    import shutil

    export_base, _ = exported
    broken = tmp_path / "export" / "1"
    shutil.copytree(os.path.join(export_base, "1"), broken)
    (broken / "saved_model.pb").write_bytes(b"\x08\x01garbage, not a SavedModel")
    out = tmp_path / "out"
    code = predict.main(["--input", os.path.join(posters, "MovieGenre-heldout.csv"), "--model", str(broken),
                         "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"--model {broken} cannot be loaded" in line and "trainer.task" in line
    assert not out.exists()


def test_a_model_trained_before_backbones_were_named_predicts_unchanged(posters, exported, tmp_path):
    """Models trained before --backbone existed: run.json names no backbone (its flags hold
    hub_handle) and the export has no backbone.json. They are read and predict as they always did."""
    import shutil

    from tagbeam import export as model_files
    from trainer import task

    export_base, labels = exported
    model_dir = tmp_path / "old-model"
    old_export = model_dir / "export" / "1"
    shutil.copytree(os.path.join(export_base, "1"), old_export)
    (old_export / "assets" / model_files.BACKBONE_JSON).unlink()
    (model_dir / "run.json").write_text(json.dumps({
        "flags": {"data_dir": "/data/posters", "model_dir": str(model_dir), "hub_handle": None, "epochs": None},
        "export_path": str(old_export), "training_path": "cached_features",
        "backbone": {"handle": "/root/.cache/tagbeam/backbones/mobilenet_v2_imagenet_feature_vector",
                     "path": "/root/.cache/tagbeam/backbones/mobilenet_v2_imagenet_feature_vector",
                     "info": {"name": "mobilenet_v2_imagenet_feature_vector", "input_size": 224}}}))
    run_info = model_files.read_run_info(str(model_dir))
    assert run_info.export_path == str(old_export) and run_info.flags["hub_handle"] is None
    assert model_files.read_backbone(str(old_export)) == {}
    # A retrain workspace's options.json of that time says --hub_handle: still parsed, as --backbone.
    assert task.parse_args(["--data_dir", "d", "--model_dir", "m", "--hub_handle", "gs://b/hub"])[1].backbone == "gs://b/hub"

    out = tmp_path / "out"
    manifest = os.path.join(posters, "MovieGenre-heldout.csv")
    assert predict.main(["--input", manifest, "--model", str(model_dir / "export"), "--output", str(out)]) == 0
    with open(glob.glob(str(out / "predictions-*.csv"))[0], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    stored = [images.process(open(os.path.join(posters, r["uri"]), "rb").read(),  # join keeps an absolute uri
                             ImageOptions(size=IMAGE_SIZE, output_format="png")) for r in rows]
    original = tf.saved_model.load(os.path.join(export_base, "1")).signatures["stored_images"]
    expected = original(image_bytes=tf.constant(stored))["probabilities"].numpy()
    np.testing.assert_allclose([[float(r[label]) for label in labels] for r in rows], expected, atol=1e-6)


def test_a_manifest_without_labels_is_predicted_not_scored_and_a_missing_labels_column_is_an_error(
        posters, exported, tmp_path, capsys):
    export_base, _ = exported
    with open(os.path.join(posters, "MovieGenre-heldout.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:6]
    manifest = tmp_path / "plain.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["uri"], *[[os.path.join(posters, r["Poster"])] for r in rows]])
    out = tmp_path / "out"
    assert predict.main(["--input", str(manifest), "--model", export_base, "--output", str(out),
                         "--allow_local_files"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predicted"] == 6 and "metrics" not in summary
    assert "The manifest has no labels" in (out / "summary.html").read_text()
    code = predict.main(["--input", str(manifest), "--model", export_base, "--output", str(tmp_path / "other"),
                         "--allow_local_files", "--labels_column", "tags"])
    err = capsys.readouterr().err
    assert code == 2 and "missing column(s) tags" in err
