"""Training/serving skew: the pipeline's stored image vs the serving signature's preprocessing.

For the same raw bytes, `pipelines.images.process` (what training reads) and the exported
signature (what serving computes) must give the same pixels and the same predictions.

Measured on these photos, |stored - served| in 8-bit levels (ranges over images and policies):
- stored losslessly (output_format="png"): mean 0.08-0.18, 99th percentile 1, max 1: only where
  Pillow's two 8-bit resize passes round differently, for every policy, for DCT-scaled ("draft")
  decodes of large JPEGs and for EXIF-rotated JPEGs;
- stored as the default 95-quality 4:2:0 JPEG, served without `jpeg_quality`: mean 1.10-2.40,
  99th percentile 6-14, max 40: the stored file's compression error (4:4:4: 0.84-1.69, 4-7, 23);
- the same, served with `jpeg_quality=95` (serving repeats the round trip with the same chroma
  subsampling): mean 0.58-0.99, 99th percentile 3-4, max 11 (4:4:4: 0.56-1.02, 3-5, 14); one-level
  input differences still flip some quantisation steps.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
import tf_keras
from PIL import Image

from pipelines.images import ImageOptions, process
from tagbeam.dataset import StoredImages
from trainer.hub import hub
from trainer.model import NonEmptyBatch
from trainer.serving import export_model, preprocess_image_bytes

from backbone_factory import write_backbone

SIZE = 224
POLICIES = ("squash", "crop", "pad")
PHOTOS = {"chelsea": skimage.data.chelsea(), "astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee()}
NUM_LABELS = 6
PROBABILITY_TOLERANCE = 0.02


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _raw_images() -> dict[str, bytes]:
    raw = {}
    for name, array in PHOTOS.items():
        raw[f"{name}.jpg"] = _encode(Image.fromarray(array), "JPEG", quality=90)
        raw[f"{name}.png"] = _encode(Image.fromarray(array), "PNG")
    # At least 4x the target per side: the pipeline decodes at 1/4 scale (1/2 for the first).
    coffee = Image.fromarray(PHOTOS["coffee"])
    raw["coffee-1000x950.jpg"] = _encode(coffee.resize((1000, 950)), "JPEG", quality=90)
    raw["coffee-1811x2000.jpg"] = _encode(coffee.resize((1811, 2000)), "JPEG", quality=90)
    # A phone photo stored sideways: the pipeline rotates it (and skips the DCT scaling).
    exif = Image.Exif()
    exif[0x0112] = 6
    raw["chelsea-rotated.jpg"] = _encode(Image.fromarray(PHOTOS["chelsea"]).resize((1000, 900)), "JPEG",
                                         quality=90, exif=exif.tobytes())
    return raw


RAW = _raw_images()


def _stored(data: bytes, policy: str, output_format: str, subsampling: str = "4:2:0") -> np.ndarray:
    stored = process(data, ImageOptions(size=SIZE, policy=policy, output_format=output_format, jpeg_quality=95,
                                        jpeg_subsampling=subsampling))
    return np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"))  # uint8, as trainer.data yields it


@pytest.fixture(scope="module")
def served_pixels() -> dict[tuple[str, int | None, str], np.ndarray]:
    """Serving's preprocessing of every raw image, [N, S, S, 3] per (policy, jpeg_quality, subsampling)."""
    batch = tf.constant(list(RAW.values()))
    return {(policy, quality, sub): preprocess_image_bytes(batch, StoredImages(SIZE, "png" if quality is None else "jpeg", policy,
                                                                             quality or 95, sub)).numpy()
            for policy in POLICIES for quality in (None, 95) for sub in ("4:2:0", "4:4:4")}


def _stats(served: np.ndarray, policy: str, output_format: str,
           subsampling: str = "4:2:0") -> list[tuple[str, float, float, float]]:
    """(image, mean, 99th percentile, max) of |stored - served| in 8-bit levels, per raw image."""
    rows = []
    for (name, data), image in zip(RAW.items(), served, strict=True):
        diff = np.abs(_stored(data, policy, output_format, subsampling).astype(np.float32) - image)  # 8-bit levels
        rows.append((f"{name} {policy}", diff.mean(), np.percentile(diff, 99), diff.max()))
    return rows


@pytest.mark.parametrize("policy", POLICIES)
def test_serving_pixels_equal_losslessly_stored_pixels_up_to_rounding(served_pixels, policy):
    for name, mean, p99, most in _stats(served_pixels[policy, None, "4:2:0"], policy, "png"):
        # Both sides are 8-bit, so differences are whole levels: at most one, on few pixels.
        assert mean < 0.25 and p99 < 1.001 and most < 1.001, f"{name}: mean {mean:.2f}, p99 {p99:.2f}, max {most:.2f}"


@pytest.mark.parametrize("subsampling", ("4:2:0", "4:4:4"))
@pytest.mark.parametrize("policy", POLICIES)
def test_serving_pixels_are_close_to_stored_jpeg_pixels(served_pixels, policy, subsampling):
    without = {name: mean for name, mean, _, _ in _stats(served_pixels[policy, None, subsampling], policy, "jpeg",
                                                         subsampling)}
    assert max(without.values()) < 2.5, f"without the JPEG round trip: {without}"
    for name, mean, p99, _ in _stats(served_pixels[policy, 95, subsampling], policy, "jpeg", subsampling):
        # The round trip with the dataset's own quality and subsampling leaves only resize rounding.
        assert mean < 1.25 and p99 < 6.0, f"{name} with the JPEG round trip: mean {mean:.2f}, p99 {p99:.2f}"
        assert mean < without[name], f"{name}: the round trip did not bring serving closer ({mean:.2f})"


def _small_model(backbone: str, training_images: np.ndarray) -> tf_keras.Model:
    """Tiny backbone + a default-initialised head whose biases centre the logits on the training
    images (so labels fall on both sides of a threshold at their median probability)."""
    tf_keras.utils.set_random_seed(0)
    images = tf_keras.Input([SIZE, SIZE, 3], dtype=tf.uint8)
    head = tf_keras.layers.Dense(NUM_LABELS)
    model = tf_keras.Model(images, head(NonEmptyBatch(hub.KerasLayer(backbone, trainable=False))(images)))
    kernel, bias = head.get_weights()
    head.set_weights([kernel, bias - model(training_images).numpy().mean(axis=0)])
    return model


@pytest.mark.parametrize("policy", POLICIES)
def test_predictions_agree_between_training_pixels_and_the_serving_signature(tmp_path, policy):
    training = np.stack([_stored(data, policy, "jpeg") for data in RAW.values()])
    model = _small_model(write_backbone(str(tmp_path / "backbone")), training)
    trained_probs = tf.sigmoid(model(training)).numpy()
    thresholds = np.median(trained_probs, axis=0).astype(np.float32) + 1e-4
    path = export_model(model, str(tmp_path / "export"), [f"l{k}" for k in range(NUM_LABELS)], thresholds,
                        StoredImages(SIZE, "jpeg", policy, 95, "4:2:0"))
    served = tf.saved_model.load(path).signatures["serving_default"](image_bytes=tf.constant(list(RAW.values())))
    gap = np.abs(served["probabilities"].numpy() - trained_probs)
    assert gap.max() < PROBABILITY_TOLERANCE, f"max probability difference {gap.max():.4f}"
    # Same labels wherever the training-side probability is not within the tolerance of the threshold.
    decisive = np.abs(trained_probs - thresholds) > PROBABILITY_TOLERANCE
    expected = trained_probs >= thresholds
    assert expected[decisive].any() and (~expected[decisive]).any(), "no decisive positives and negatives"
    assert np.array_equal(served["predicted"].numpy().astype(bool)[decisive], expected[decisive])
