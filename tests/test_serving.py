"""The serving SavedModel: signature, assets, layout, and a fresh-process reload with TensorFlow only."""
from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
import tf_keras
from PIL import Image, ImageOps

from tagbeam.dataset import StoredImages
from trainer.hub import hub
from trainer.model import NonEmptyBatch
from trainer.serving import export_model, preprocess_image_bytes

from backbone_factory import write_backbone
from image_factory import encode

LABELS = ["cat", "coffee", "outdoor", "person"]
SIZE = 64  # small: the tiny backbone accepts any size, and serving cost is not under test here
CROP_PNG = StoredImages(SIZE, "png", "crop", 95, "4:2:0")  # what the exports here say about their dataset


def _png(size: int, policy: str) -> StoredImages:
    """Stored as PNG: serving's pixels without a JPEG round trip."""
    return StoredImages(size, "png", policy, 95, "4:2:0")


def build_model(backbone: str, num_labels: int, image_size: int) -> tf_keras.Model:
    """A tf_keras model around a hub.KerasLayer, built under a 2-replica MirroredStrategy as in training."""
    # ReductionToOneDevice: see tests/test_losses.py::_strategy (collective-key clashes between strategies).
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        tf_keras.utils.set_random_seed(0)
        images = tf_keras.Input([image_size, image_size, 3], dtype=tf.uint8)  # the export contract
        features = NonEmptyBatch(hub.KerasLayer(backbone, trainable=False))(images)
        logits = tf_keras.layers.Dense(num_labels, bias_initializer=tf_keras.initializers.Constant(0.0))(features)
        model = tf_keras.Model(images, logits)
    assert isinstance(model.trainable_variables[0], tf.distribute.DistributedValues)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    model = build_model(write_backbone(str(root / "backbone")), len(LABELS), SIZE)
    images = {
        "chelsea.jpg": encode(skimage.data.chelsea(), "JPEG", quality=90),
        "coffee.png": encode(skimage.data.coffee(), "PNG"),
    }
    batch = tf.constant(list(images.values()))
    probs = tf.sigmoid(model(preprocess_image_bytes(batch, CROP_PNG))).numpy()
    # Halfway between the two images' probabilities: each label is predicted for exactly one image.
    assert np.all(np.abs(probs[0] - probs[1]) > 1e-3), probs
    thresholds = ((probs[0] + probs[1]) / 2).astype(np.float32)
    path = export_model(model, str(root / "export"), LABELS, thresholds, CROP_PNG, version=7)
    return {"root": root, "path": path, "model": model, "images": images, "probs": probs, "thresholds": thresholds}


def test_export_layout_and_assets(exported):
    path = exported["path"]
    assert path == str(exported["root"] / "export" / "7")
    assert sorted(os.listdir(exported["root"] / "export")) == ["7"]  # the staging folder was renamed away
    assert {"saved_model.pb", "variables", "assets"} <= set(os.listdir(path))
    assets = exported["root"] / "export" / "7" / "assets"
    assert (assets / "labels.txt").read_text().splitlines() == LABELS
    mapping = json.loads((assets / "thresholds.json").read_text())["thresholds"]
    assert list(mapping) == LABELS
    np.testing.assert_allclose(list(mapping.values()), exported["thresholds"], rtol=1e-6)
    size_kib = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1024
    assert size_kib < 2048, f"export is {size_kib:.0f} KiB: the Keras model or backbone was serialised twice?"


def test_signature_names_shapes_and_dtypes(exported):
    signature = tf.saved_model.load(exported["path"]).signatures["serving_default"]
    args, kwargs = signature.structured_input_signature
    assert args == () and list(kwargs) == ["image_bytes"]
    assert kwargs["image_bytes"] == tf.TensorSpec([None], tf.string, name="image_bytes")
    outputs = signature.structured_outputs
    assert sorted(outputs) == ["predicted", "predicted_labels", "probabilities"]
    assert (outputs["probabilities"].dtype, outputs["predicted_labels"].dtype, outputs["predicted"].dtype) == (
        tf.float32, tf.string, tf.int32)
    assert all(spec.shape.as_list() == [None, len(LABELS)] for spec in outputs.values())


_FRESH_PROCESS = textwrap.dedent(
    """
    import base64, json, sys
    # Started with -I -S: no site module, so no .pth files and no editable install of this
    # project; only the venv's site-packages directory is put back, for TensorFlow itself.
    sys.path.append(sys.argv[1])
    try:
        import trainer  # noqa: F401
        project_importable = True
    except ImportError:
        project_importable = False
    import tensorflow as tf

    before = set(sys.modules)
    loaded = tf.saved_model.load(sys.argv[2])
    serve = loaded.signatures["serving_default"]
    request = json.load(open(sys.argv[3]))

    def as_tensor_input(value):
        # What TF Serving's REST front end does with {"b64": ...}: base64-decode to raw bytes.
        return base64.b64decode(value["b64"]) if isinstance(value, dict) and set(value) == {"b64"} else value

    instances = [{name: as_tensor_input(v) for name, v in instance.items()} for instance in request["instances"]]
    outputs = serve(image_bytes=tf.constant([instance["image_bytes"] for instance in instances]))
    print(json.dumps({
        "project_importable": project_importable,
        "loaded_modules": sorted({m.split(".")[0] for m in set(sys.modules) - before} & {"tensorflow_hub", "tf_keras", "keras"}),
        "hub_or_tf_keras": sorted(m for m in ("tensorflow_hub", "tf_keras") if m in sys.modules),
        "probabilities": outputs["probabilities"].numpy().tolist(),
        "predicted": outputs["predicted"].numpy().tolist(),
        "predicted_labels": [[s.decode() for s in row] for row in outputs["predicted_labels"].numpy()],
        "labels_asset": open(loaded.labels_file.asset_path.numpy().decode()).read(),
    }))
    """
)


def serve_in_fresh_process(export_path: str, images: list[bytes], tmp_path) -> dict:
    """A REST-style request answered by `export_path` in a process that has TensorFlow and nothing
    of this project, hub or Keras; returns what it answered (and what it could import)."""
    request = {"instances": [{"image_bytes": {"b64": base64.b64encode(data).decode("ascii")}} for data in images]}
    request_path = tmp_path / "request.json"
    request_path.write_text(json.dumps(request))
    site_packages = sysconfig.get_paths()["purelib"]
    # TF_USE_LEGACY_KERAS is set in this process by `import tensorflow_transform` (other tests); a
    # serving process has no reason to carry it, and it would make TensorFlow load tf_keras.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _FRESH_PROCESS, site_packages, export_path, str(request_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["project_importable"] is False
    # TensorFlow may pull in Keras 3 by itself; loading and serving must add no Keras or hub.
    assert result["loaded_modules"] == [] and result["hub_or_tf_keras"] == [], result
    return result


def test_reloads_in_a_fresh_tensorflow_only_process_and_answers_a_rest_request(exported, tmp_path):
    result = serve_in_fresh_process(exported["path"], list(exported["images"].values()), tmp_path)
    assert result["labels_asset"].splitlines() == LABELS
    probs = np.array(result["probabilities"])
    np.testing.assert_allclose(probs, exported["probs"], atol=1e-5)
    expected = probs >= exported["thresholds"]
    assert np.array_equal(np.array(result["predicted"]), expected.astype(int))
    assert result["predicted_labels"] == [[name if chosen else "" for name, chosen in zip(LABELS, row, strict=True)] for row in expected]
    assert expected.any(axis=1).all() and (~expected).any(axis=1).all()  # mixed predictions: the check has teeth


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_an_embedded_backbone_serves_jpeg_bytes_without_the_project(name, tmp_path):
    """Each embedded backbone under a trained head, exported, answers JPEG bytes in a process with
    TensorFlow alone, as it answers in training's process."""
    from trainer import embedded_backbone

    photos = {"chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee()}
    jpegs = [encode(np.ascontiguousarray(photo[::k, ::k]), "JPEG", quality=90)
             for photo in photos.values() for k in (1, 2, 3)]
    labels = list(photos)
    model = build_model(embedded_backbone.build(name=name), len(labels), SIZE)
    model.compile(tf_keras.optimizers.Adam(0.05), tf_keras.losses.BinaryCrossentropy(from_logits=True))
    pixels = preprocess_image_bytes(tf.constant(jpegs), CROP_PNG)
    truth = np.repeat(np.eye(2, dtype=np.float32), 3, axis=0)  # 3 sizes of each photo
    model.fit(pixels, truth, epochs=20, batch_size=6, verbose=0)
    probs = tf.sigmoid(model(pixels)).numpy()
    assert (probs.argmax(axis=1) == truth.argmax(axis=1)).all(), probs  # the head learnt the two photos
    path = export_model(model, str(tmp_path / "export"), labels, np.full(2, 0.5, np.float32), CROP_PNG, version=1,
                        backbone={"name": name})
    result = serve_in_fresh_process(path, jpegs, tmp_path)
    np.testing.assert_allclose(result["probabilities"], probs, atol=1e-5)
    assert [row[0] for row in result["predicted_labels"]] == ["chelsea"] * 3 + [""] * 3


def test_versions_increase_and_are_never_overwritten(exported, tmp_path):
    model, thresholds = exported["model"], exported["thresholds"]
    base = tmp_path / "export"
    (base / "9999999999").mkdir(parents=True)  # a version from "the future": the next one must be above it
    (base / "notes").mkdir()
    latest = export_model(model, str(base), LABELS, thresholds, CROP_PNG)
    assert os.path.basename(latest) == "10000000000"
    with pytest.raises(FileExistsError, match="10000000000 already exists"):
        export_model(model, str(base), LABELS, thresholds, CROP_PNG, version=10000000000)
    with pytest.raises(ValueError, match="4 outputs, but got 3 labels"):
        export_model(model, str(base), LABELS[:3], thresholds[:3], CROP_PNG)
    assert sorted(os.listdir(base)) == ["10000000000", "9999999999", "notes"]


def test_preprocess_batches_mixed_formats_and_rejects_bad_input():
    photo = skimage.data.astronaut()[::4, ::4]
    grey_alpha = np.dstack([photo[..., 0], np.full(photo.shape[:2], 128, np.uint8)])
    batch = [encode(photo, "JPEG"), encode(photo, "PNG"), encode(photo, "GIF"), encode(photo, "BMP"),
             encode(grey_alpha, "PNG")]
    out = preprocess_image_bytes(tf.constant(batch), _png(32, "pad"))
    assert out.shape == (5, 32, 32, 3) and out.dtype == tf.uint8  # the 8-bit pixels a dataset stores
    assert int(tf.reduce_max(out[:4])) > 200
    # Half-transparent grey on white: every pixel at least halfway to white.
    assert int(tf.reduce_min(out[4])) >= 125
    assert preprocess_image_bytes(tf.constant([], tf.string), _png(32, "squash")).shape == (0, 32, 32, 3)
    with pytest.raises(ValueError, match="resize_policy 'stretch' is not one of"):
        preprocess_image_bytes(tf.constant(batch[:1]), _png(32, "stretch"))
    with pytest.raises(tf.errors.InvalidArgumentError):
        preprocess_image_bytes(tf.constant([b"not an image"]), _png(32, "squash"))


def _with_exif_orientation(jpeg: bytes, orientation: int, big_endian: bool) -> bytes:
    """Inserts an APP1/Exif segment with one IFD0 entry, after the JFIF APP0 segment."""
    order, u16, u32 = (b"MM", ">H", ">I") if big_endian else (b"II", "<H", "<I")
    tiff = order + struct.pack(u16, 42) + struct.pack(u32, 8) + struct.pack(u16, 1)
    tiff += struct.pack(u16, 0x0112) + struct.pack(u16, 3) + struct.pack(u32, 1) + struct.pack(u16, orientation) + b"\0\0"
    tiff += struct.pack(u32, 0)
    payload = b"Exif\0\0" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    app0_end = 4 + struct.unpack(">H", jpeg[4:6])[0]
    assert jpeg[2:4] == b"\xff\xe0"
    return jpeg[:app0_end] + app1 + jpeg[app0_end:]


def test_exif_orientation_is_applied_like_pillow():
    photo = skimage.data.chelsea()[::2, ::3]  # 150 x 151: not square, so a wrong rotation shows
    plain = encode(photo, "JPEG", quality=92)
    cases = [(o, big) for o in range(1, 9) for big in (False, True)]
    batch = [_with_exif_orientation(plain, o, big) for o, big in cases]
    got = preprocess_image_bytes(tf.constant(batch), _png(48, "squash")).numpy()
    for (orientation, big_endian), data, image in zip(cases, batch, got, strict=True):
        upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        expected = np.round(tf.image.resize(upright / 255.0, [48, 48], antialias=True).numpy() * 255)
        # Serving rounds to 8 bits like a stored image: at most a level apart where a value sits on .5.
        assert np.abs(image - expected).max() < 1.001, f"orientation {orientation}, big endian {big_endian}"
