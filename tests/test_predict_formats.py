"""Batch prediction sees the pixels training saw, for every format preprocessing accepts.

Each image of every fixture format is preprocessed into a dataset, a model is trained on it and
exported, and the same manifest is predicted: predict's probabilities must equal the exported model
applied to the stored training example of the same image, and every row preprocessing rejects must be
rejected by predict with the same stage and reason. Then the Planet path end to end on 4-band 16-bit
TIFF chips (preprocess --image_ext tif -> train -> predict held-out chips).
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
import tifffile
from PIL import Image

from pipelines import images, predict, preprocess
from tagbeam import dataset, export
from trainer import task

from backbone_factory import write_backbone
from image_factory import encode, png_header

SIZE = 32


def _chip(seed: int, side: int = 48) -> bytes:
    """A Planet-style 4-band (B, G, R, NIR) uint16 GeoTIFF-like chip with smooth structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    bands = [3000 + 2000 * np.sin(6 * xx * (k + 1) + rng.uniform(0, 3)) * np.cos(4 * yy + k) for k in range(4)]
    out = io.BytesIO()
    tifffile.imwrite(out, np.stack(bands, axis=-1).astype(np.uint16), photometric="minisblack", planarconfig="contig")
    return out.getvalue()


def _fixtures() -> dict[str, bytes]:
    astronaut = Image.fromarray(skimage.data.astronaut()).resize((160, 160))
    coffee = Image.fromarray(skimage.data.coffee()).resize((180, 120))
    chelsea = Image.fromarray(skimage.data.chelsea()).resize((150, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 clockwise: the decoder must turn it upright
    rgba = astronaut.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(astronaut.size))
    grey16 = Image.fromarray((np.asarray(coffee.convert("L"), np.uint16) * 200).astype(np.uint16))
    jpeg = encode(astronaut, "JPEG", quality=90)
    return {
        "jpeg.jpg": jpeg,
        "cmyk.jpg": encode(coffee.convert("CMYK"), "JPEG", quality=90),
        "exif.jpg": encode(chelsea, "JPEG", quality=90, exif=exif),
        "progressive.jpg": encode(coffee, "JPEG", quality=85, progressive=True),
        "rgb.png": encode(chelsea, "PNG"),
        "grey16.png": encode(grey16, "PNG"),
        "palette.png": encode(astronaut.quantize(64), "PNG"),
        "alpha.png": encode(rgba, "PNG"),
        "animated.gif": encode(coffee.quantize(64), "GIF", save_all=True,
                                append_images=[chelsea.resize(coffee.size).quantize(64)], duration=50),
        "lossy.webp": encode(astronaut, "WEBP", quality=80),
        "plain.bmp": encode(chelsea, "BMP"),
        "rgb.tif": encode(coffee, "TIFF"),
        "planet.tif": _chip(1),
        # Rows preprocessing rejects: predict must reject them the same way.
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "page.jpg": b"<html><body>Not found</body></html>",
        "bomb.png": png_header(20000, 20000),
    }


def _tiny_model(tmp_path, data_dir: str) -> str:
    """trainer.task, briefly, with a small random backbone: a real export of a real run."""
    backbone = write_backbone(str(tmp_path / "backbone"), seed=3)
    model_dir = str(tmp_path / "model")
    assert task.main(["--data_dir", data_dir, "--model_dir", model_dir, "--hub_handle", backbone, "--epochs", "2",
                      "--batch_size", "8", "--seed", "1"]) == 0
    return json.loads(open(os.path.join(model_dir, "run.json")).read())["export_path"]


def _rejected(folder: str) -> dict[str, str]:
    found = {}
    for path in glob.glob(os.path.join(folder, "rejected-*.jsonl")):
        for line in open(path, encoding="utf-8"):
            record = dataset.Rejection.from_json(line)
            found[record.id] = record.key
    return found


def _predicted(folder: str) -> dict[str, np.ndarray]:
    rows = {}
    for path in glob.glob(os.path.join(folder, "predictions-*.jsonl")):
        for line in open(path, encoding="utf-8"):
            record = json.loads(line)
            rows[record["id"]] = record
    return rows


def _stored_examples(info: dataset.DatasetInfo) -> dict[str, bytes]:
    spec = {dataset.FEATURE_ID: tf.io.FixedLenFeature([], tf.string),
            dataset.FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string)}
    stored = {}
    for split in dataset.SPLITS:
        for record in tf.data.TFRecordDataset(list(info.shard_paths(split)), info.compression_type):
            example = tf.io.parse_single_example(record, spec)
            stored[example[dataset.FEATURE_ID].numpy().decode()] = example[dataset.FEATURE_IMAGE].numpy()
    return stored


def _model_on_stored(export_path: str, stored: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The exported model applied to the stored training examples, decoded as training decodes them."""
    signature = tf.saved_model.load(export_path).signatures[export.STORED_SIGNATURE_NAME]
    ids = sorted(stored)
    probabilities = signature(**{export.INPUT_NAME: tf.constant([stored[i] for i in ids])})["probabilities"].numpy()
    return dict(zip(ids, probabilities, strict=True))


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_predict_sees_the_training_pixels_of_every_format(tmp_path, image_format):
    folder = tmp_path / "images"
    folder.mkdir()
    fixtures = _fixtures()
    rows = [["uri", "labels"]]
    for i, (name, data) in enumerate(sorted(fixtures.items())):
        (folder / name).write_bytes(data)
        rows.append([f"images/{name}", "a|b" if i % 3 == 0 else ("a" if i % 3 == 1 else "b")])
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    data_dir = str(tmp_path / "dataset")
    assert preprocess.main(["--input", str(manifest), "--output", data_dir, "--image_size", str(SIZE),
                            "--image_format", image_format, "--val_fraction", "0.25", "--test_fraction", "0.25"]) == 0
    info = dataset.read(data_dir)
    export_path = _tiny_model(tmp_path, data_dir)
    out = str(tmp_path / "predictions")
    assert predict.main(["--input", str(manifest), "--model", os.path.dirname(export_path), "--output", out,
                         "--output_format", "jsonl", "--batch_size", "5"]) == 0

    stored = _stored_examples(info)
    expected_ok = {f"images/{name}" for name in fixtures if name not in ("truncated.jpg", "page.jpg", "bomb.png")}
    assert set(stored) == expected_ok  # every fixture format made it into the dataset
    predicted = _predicted(out)
    assert set(predicted) == expected_ok
    reference = _model_on_stored(export_path, stored)
    for id_, record in predicted.items():
        ours = np.array([record["probabilities"][label] for label in info.labels])
        np.testing.assert_allclose(ours, reference[id_], atol=1e-5, err_msg=id_)
    # Rows preprocessing rejected, predict rejected with the same stage and reason.
    assert _rejected(out) == _rejected(data_dir) and len(_rejected(out)) == 3
    assert _rejected(out)["images/bomb.png"] == "decode:too_many_pixels"


def test_planet_tiff_chips_end_to_end(tmp_path):
    chips = tmp_path / "train-tif-v2"
    chips.mkdir()
    tags = ["clear primary", "haze primary", "clear water", "cloudy"]
    for i in range(24):
        (chips / f"train_{i}.tif").write_bytes(_chip(100 + i))
    with open(tmp_path / "train_v2.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image_name", "tags"]] + [[f"train_{i}", tags[i % 4]] for i in range(20)])
    with open(tmp_path / "heldout.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image_name", "tags"]] + [[f"train_{i}", ""] for i in range(20, 24)])
    data_dir = str(tmp_path / "dataset")
    planet = ["--format", "planet", "--image_ext", "tif", "--image_root", str(chips)]
    assert preprocess.main(["--input", str(tmp_path / "train_v2.csv"), "--output", data_dir, *planet,
                            "--image_size", str(SIZE), "--val_fraction", "0.2", "--test_fraction", "0.2"]) == 0
    info = dataset.read(data_dir)
    assert info.examples == 20 and info.rejected == 0
    export_path = _tiny_model(tmp_path, data_dir)
    out = str(tmp_path / "predictions")
    assert predict.main(["--input", str(tmp_path / "heldout.csv"), "--model", export_path, "--output", out,
                         "--output_format", "jsonl", *planet]) == 0
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert (summary["input_rows"], summary["predicted"], summary["rejected"]) == (4, 4, 0)
    # The held-out chips reach the model exactly as the pipeline would have stored them.
    stored = export.read_stored_images(export_path)
    options = images.ImageOptions(size=stored.image_size, policy=stored.resize_policy,
                                  output_format=stored.image_format, jpeg_quality=stored.jpeg_quality,
                                  jpeg_subsampling=stored.jpeg_subsampling)
    reference = _model_on_stored(export_path, {f"train_{i}": images.process((chips / f"train_{i}.tif").read_bytes(),
                                                                              options) for i in range(20, 24)})
    for id_, record in _predicted(out).items():
        np.testing.assert_allclose([record["probabilities"][label] for label in info.labels], reference[id_],
                                   atol=1e-5)


def test_online_serving_names_a_format_it_does_not_decode(tmp_path):
    from tagbeam.stored import StoredImages
    from trainer.serving import preprocess_image_bytes

    serve = tf.function(lambda batch: preprocess_image_bytes(batch, StoredImages(SIZE, "png", "squash", 95, "4:2:0")))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[TIFF\].*decodes JPEG, PNG, GIF, BMP, WebP only"):
        serve(tf.constant([_chip(7)]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[an unknown format\]"):
        serve(tf.constant([b"<html>not an image</html>"]))
    assert serve(tf.constant([encode(Image.new("RGB", (40, 30)), "WEBP")])).shape == (1, SIZE, SIZE, 3)
