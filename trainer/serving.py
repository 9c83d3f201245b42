"""Serving: the pipeline's image preprocessing as TF ops, and the SavedModel export.

The exported signature takes encoded image bytes, so clients send the files they have and the
server turns them into exactly the pixels the training images got (docs/dataset.md,
pipelines/images.py): same decoder settings, EXIF rotation, alpha on white, JPEG DCT scaling and
resize geometry. TF Serving's REST API turns a JSON value ``{"b64": "..."}`` into the raw bytes
of a string input, so a request is ``{"instances": [{"image_bytes": {"b64": "<base64 JPEG>"}}]}``;
the ``_bytes`` suffix is the naming convention Google's hosted prediction services (AI Platform,
Vertex AI's TensorFlow containers) use to recognise binary inputs.
"""
from __future__ import annotations

import json
import posixpath
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from tagbeam import export as model_files
from tagbeam.dataset import DRAFT_MARGIN, StoredImages, labels_text

# The pipeline lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale ("draft") as long as both
# sides keep at least DRAFT_MARGIN times the target size; serving must decode at the same scale.
_DRAFT_RATIOS = (1, 2, 4, 8)
# EXIF orientation lives in the JPEG's APP1 segment, before the image data: the first 64 KiB hold
# it in practice (APP segments are at most 64 KiB each, and APP1/Exif normally comes first).
_EXIF_SEARCH_BYTES = 65536
_MAX_SEGMENTS = 16
_MAX_IFD_ENTRIES = 64
_ORIENTATION_TAG = 0x0112


def _jpeg_orientation(data: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (1-8) of a JPEG, 1 when absent or unreadable, as Pillow reads it.

    Walks the JPEG segments to the first APP1 starting with "Exif\\0\\0", then the TIFF header
    and IFD0 to tag 0x0112.
    """
    head = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 0, _EXIF_SEARCH_BYTES), tf.uint8,
                                    fixed_length=_EXIF_SEARCH_BYTES), tf.int32)
    exif_magic = tf.constant([ord(c) for c in "Exif"] + [0, 0], tf.int32)

    def byte(i: tf.Tensor) -> tf.Tensor:
        return tf.gather(head, tf.clip_by_value(i, 0, _EXIF_SEARCH_BYTES - 1))

    def next_segment(step, pos, tiff):
        marker = byte(pos + 1)
        is_exif = tf.logical_and(
            tf.equal(marker, 0xE1),
            tf.reduce_all(tf.equal(byte(pos + 4 + tf.range(6)), exif_magic)),
        )
        tiff = tf.where(is_exif, pos + 10, tiff)
        return step + 1, pos + 2 + byte(pos + 2) * 256 + byte(pos + 3), tiff

    def more(step, pos, tiff):
        marker = byte(pos + 1)
        return (step < _MAX_SEGMENTS) & (tiff < 0) & (pos + 4 < _EXIF_SEARCH_BYTES) \
            & tf.equal(byte(pos), 0xFF) & (marker != 0xDA) & (marker != 0xD9)

    _, _, tiff = tf.while_loop(more, next_segment, (tf.constant(0), tf.constant(2), tf.constant(-1)))
    little_endian = tf.equal(byte(tiff), ord("I"))

    def u16(i: tf.Tensor) -> tf.Tensor:
        low, high = tf.where(little_endian, byte(i), byte(i + 1)), tf.where(little_endian, byte(i + 1), byte(i))
        return high * 256 + low

    def u32(i: tf.Tensor) -> tf.Tensor:
        low, high = tf.where(little_endian, u16(i), u16(i + 2)), tf.where(little_endian, u16(i + 2), u16(i))
        return high * 65536 + low

    ifd = tiff + u32(tiff + 4)
    entries = ifd + 2 + 12 * tf.range(_MAX_IFD_ENTRIES)
    in_ifd = tf.range(_MAX_IFD_ENTRIES) < u16(ifd)
    is_orientation = in_ifd & tf.equal(u16(entries), _ORIENTATION_TAG)
    value = tf.reduce_max(tf.where(is_orientation, u16(entries + 8), 0))
    valid = (tiff >= 0) & (value >= 1) & (value <= 8)
    return tf.where(valid, value, 1)


def _orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Applies an EXIF orientation like PIL.ImageOps.exif_transpose (plain reverses and
    transposes: tf.image.rot90 builds far bigger graphs)."""
    def transposed() -> tf.Tensor:
        return tf.transpose(image, [1, 0, 2])

    return tf.switch_case(orientation - 1, [
        lambda: image,
        lambda: tf.reverse(image, [1]),  # mirrored left-right
        lambda: tf.reverse(image, [0, 1]),  # rotated 180
        lambda: tf.reverse(image, [0]),  # mirrored top-bottom
        transposed,
        lambda: tf.reverse(transposed(), [1]),  # rotated 90 clockwise
        lambda: tf.reverse(transposed(), [0, 1]),  # transverse
        lambda: tf.reverse(transposed(), [0]),  # rotated 90 counter-clockwise
    ])


def _decode_jpeg(data: tf.Tensor, ratio_index: tf.Tensor) -> tf.Tensor:
    """JPEG -> uint8 [H, W, 3] as Pillow decodes it: at 1/_DRAFT_RATIOS[ratio_index] scale, with
    the accurate integer IDCT (TensorFlow's default, INTEGER_FAST, differs from Pillow by about
    1.3/255 on average and up to 18/255)."""
    return tf.switch_case(ratio_index, [
        lambda ratio=ratio: tf.io.decode_jpeg(data, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")
        for ratio in _DRAFT_RATIOS
    ])


def _decode_other(data: tf.Tensor) -> tf.Tensor:
    """PNG / GIF / BMP / WebP -> uint8 [H, W, 3], alpha composited on white like the pipeline.

    decode_image(channels=3) would drop alpha and expose whatever colour transparent pixels
    store (often black).
    """
    image = tf.io.decode_image(data, channels=0, expand_animations=False, dtype=tf.uint8)
    channels = tf.shape(image)[2]
    colour = tf.cond(channels < 3, lambda: tf.tile(image[:, :, :1], [1, 1, 3]), lambda: image[:, :, :3])
    alpha = tf.cond(
        tf.equal(channels % 2, 0),  # grey + alpha (2) or RGBA (4)
        lambda: tf.cast(image[:, :, -1:], tf.float32) / 255.0,
        lambda: tf.ones_like(image[:, :, :1], tf.float32),
    )
    on_white = tf.cast(colour, tf.float32) * alpha + 255.0 * (1.0 - alpha)
    # Pillow's alpha_composite rounds to 8 bits; rounding here keeps the two within 1/255.
    return tf.ensure_shape(tf.cast(tf.round(on_white), tf.uint8), [None, None, 3])


def _decode(data: tf.Tensor, image_size: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(float32 RGB [h, w, 3] in [0, 1], source height, source width, scale).

    The image is upright (EXIF applied) and `scale` times smaller than the source when it was
    draft-decoded, which the pipeline does only for upright JPEGs.
    """
    def jpeg():
        orientation = _jpeg_orientation(data)
        shape = tf.image.extract_jpeg_shape(data)
        fits = tf.minimum(shape[0], shape[1]) // (DRAFT_MARGIN * image_size)
        ratio_index = tf.where(
            tf.equal(orientation, 1), tf.reduce_sum(tf.cast(fits >= tf.constant(_DRAFT_RATIOS[1:]), tf.int32)), 0)
        image = _orient(_decode_jpeg(data, ratio_index), orientation)
        return image, tf.gather(tf.constant(_DRAFT_RATIOS), ratio_index), shape[0], shape[1]

    def other():
        image = _decode_other(data)
        return image, tf.constant(1), tf.shape(image)[0], tf.shape(image)[1]

    image, scale, source_h, source_w = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    # Without draft the source size is the (possibly rotated) decoded size.
    source_h = tf.where(scale > 1, source_h, tf.shape(image)[0])
    source_w = tf.where(scale > 1, source_w, tf.shape(image)[1])
    return tf.image.convert_image_dtype(image, tf.float32), source_h, source_w, scale


def _resample(image: tf.Tensor, scale: tf.Tensor, region: tuple, out_h, out_w) -> tf.Tensor:
    """Antialiased bilinear resize of `region` (y0, x0, y1, x1 in source pixels) to [out_h, out_w].

    As in the pipeline, the region is fractional in decoded pixels after a draft decode, and no
    pixel outside it is read: crop to the covering whole pixels, then resize the fractional box
    inside. ScaleAndTranslate is the op under tf.image.resize(..., antialias=True); its scale and
    translation express the fractional box (with a whole-image box it is tf.image.resize exactly).
    """
    y0, x0, y1, x1 = (tf.cast(v, tf.float32) / tf.cast(scale, tf.float32) for v in region)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    top, left = tf.cast(tf.floor(y0), tf.int32), tf.cast(tf.floor(x0), tf.int32)
    bottom = tf.minimum(tf.cast(tf.math.ceil(y1), tf.int32), height)
    right = tf.minimum(tf.cast(tf.math.ceil(x1), tf.int32), width)
    crop = image[top:bottom, left:right]
    size = tf.stack([out_h, out_w])
    zoom = tf.cast(size, tf.float32) / tf.stack([y1 - y0, x1 - x0])
    offset = tf.stack([y0 - tf.cast(top, tf.float32), x0 - tf.cast(left, tf.float32)])
    resized = tf.raw_ops.ScaleAndTranslate(
        images=crop[tf.newaxis], size=size, scale=zoom, translation=-offset * zoom,
        kernel_type="triangle", antialias=True,
    )
    return resized[0]


def _pad_geometry(height: tf.Tensor, width: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(new_height, new_width) of the `pad` policy, in the pipeline's integer arithmetic: the
    shorter side becomes round(short * size / long) with halves rounded up, at least 1."""
    long_side = tf.maximum(height, width)
    short_side = tf.minimum(height, width)
    scaled = tf.maximum(1, (2 * short_side * size + long_side) // (2 * long_side))
    return tf.where(width >= height, scaled, size), tf.where(width >= height, size, scaled)


def _preprocess_one(data: tf.Tensor, size: int, resize_policy: str) -> tf.Tensor:
    image, height, width, scale = _decode(data, size)
    if resize_policy == "squash":
        return _resample(image, scale, (0, 0, height, width), size, size)
    if resize_policy == "crop":
        side = tf.minimum(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return _resample(image, scale, (top, left, top + side, left + side), size, size)
    new_h, new_w = _pad_geometry(height, width, size)
    resized = _resample(image, scale, (0, 0, height, width), new_h, new_w)
    return tf.image.pad_to_bounding_box(resized, (size - new_h) // 2, (size - new_w) // 2, size, size)


# (name, offset, magic) of formats a client may send; the signature decodes SERVING_FORMATS only.
_MAGIC = (("PNG", 0, b"\x89PNG\r\n\x1a\n"), ("GIF", 0, b"GIF8"), ("BMP", 0, b"BM"), ("WebP", 8, b"WEBP"),
          ("TIFF", 0, b"II*\x00"), ("TIFF", 0, b"MM\x00*"), ("HEIF/AVIF", 4, b"ftyp"), ("PDF", 0, b"%PDF"))


def _check_format(data: tf.Tensor) -> tf.Operation:
    """Refuses an image TensorFlow cannot decode with an error that names its format (TF's own
    says only which formats it wants)."""
    name = tf.constant("an unknown format")
    for format_name, offset, magic in reversed(_MAGIC):
        name = tf.where(tf.equal(tf.strings.substr(data, offset, len(magic)), magic), format_name, name)
    name = tf.where(tf.io.is_jpeg(data), "JPEG", name)
    supported = tf.reduce_any(tf.equal(name, list(model_files.SERVING_FORMATS)))
    return tf.debugging.Assert(supported, [
        "image_bytes holds", name, f"; {model_files.SIGNATURE_NAME} decodes {', '.join(model_files.SERVING_FORMATS)} "
        "only: convert the image, or use `python -m pipelines.predict`, which reads every format the pipeline does"])


def preprocess_image_bytes(image_bytes: tf.Tensor, stored: StoredImages) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP/WebP strings [B] -> uint8 [B, S, S, 3], the pixels the pipeline
    stores for the same bytes (pipelines/images.py, docs/dataset.md) and trainer.data reads back:
    resized as ``stored`` says, and through its codec (`StoredImages.through_codec`), so that the
    images carry the compression error the training images carry.
    Per-image work runs in tf.map_fn because images differ in size. A batch with an undecodable
    image fails as a whole (TF Serving answers 400 with the decode error).
    """
    image_size = stored.image_size

    def one(data: tf.Tensor) -> tf.Tensor:
        with tf.control_dependencies([_check_format(data)]):
            resized = tf.clip_by_value(_preprocess_one(data, image_size, stored.resize_policy), 0.0, 1.0)
        return stored.through_codec(resized)

    return tf.map_fn(
        one,
        tf.convert_to_tensor(image_bytes, tf.string),
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8),
    )


class _Servable(tf.Module):
    """What the SavedModel holds: the model's variables, the assets, and the signature functions.

    The Keras model itself is deliberately not tracked: only the variables its call captures are,
    so the SavedModel contains no Keras (or tensorflow_hub) objects and loads with TensorFlow alone.
    """

    def __init__(self, model: tf_keras.Model, labels: Sequence[str], thresholds: np.ndarray, stored: StoredImages,
                 asset_dir: str) -> None:
        super().__init__(name="tagbeam_servable")
        self.model_variables = list(model.variables)
        self.labels_file = tf.saved_model.Asset(posixpath.join(asset_dir, model_files.LABELS_TXT))
        self.thresholds_file = tf.saved_model.Asset(posixpath.join(asset_dir, model_files.THRESHOLDS_JSON))
        self.stored_images_file = tf.saved_model.Asset(posixpath.join(asset_dir, model_files.STORED_IMAGES_JSON))
        self.backbone_file = tf.saved_model.Asset(posixpath.join(asset_dir, model_files.BACKBONE_JSON))
        label_names = tf.constant(list(labels), tf.string)
        label_thresholds = tf.constant(thresholds, tf.float32)

        def outputs(images: tf.Tensor) -> dict[str, tf.Tensor]:
            probabilities = tf.sigmoid(tf.cast(model(images, training=False), tf.float32))
            chosen = probabilities >= label_thresholds
            names = tf.broadcast_to(label_names, tf.shape(probabilities))
            return {
                model_files.OUTPUT_PROBABILITIES: probabilities,
                model_files.OUTPUT_PREDICTED_LABELS: tf.where(chosen, names, tf.constant("", tf.string)),
                model_files.OUTPUT_PREDICTED: tf.cast(chosen, tf.int32),
            }

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=model_files.INPUT_NAME)])
        def serve(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
            return outputs(preprocess_image_bytes(image_bytes, stored))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=model_files.INPUT_NAME)])
        def serve_stored(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
            size = stored.image_size
            return outputs(tf.map_fn(stored.decode, image_bytes,
                                     fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8)))

        self.serve, self.serve_stored = serve, serve_stored


def _next_version(export_base: str) -> int:
    """Seconds since the epoch, bumped past any existing numeric version so versions only increase."""
    existing = [int(n.rstrip("/")) for n in tf.io.gfile.listdir(export_base) if n.rstrip("/").isdigit()]
    return max([int(time.time())] + [v + 1 for v in existing])


def export_model(
    model: tf_keras.Model,
    export_base: str,
    labels: Sequence[str],
    thresholds: np.ndarray,
    stored: StoredImages,
    version: int | None = None,
    backbone: Mapping[str, Any] | None = None,
) -> str:
    """Writes the serving SavedModel to ``<export_base>/<version>/`` and returns that folder.

    ``model`` maps uint8 images [B, S, S, 3] to logits [B, K]; ``stored`` is how its dataset stores
    images (``DatasetInfo.stored_images``): ``serving_default`` reproduces it from encoded source
    images, ``stored_images`` takes images already made that way (pipelines.predict), and the
    ``stored_images.json`` asset records it. The SavedModel is written to a hidden sibling folder
    first and renamed into place, so TF Serving (which watches ``export_base`` for numeric
    folders) never sees a partial version. ``backbone`` (which backbone the model stands on, as
    run.json's "backbone" records it) becomes the ``backbone.json`` asset.
    """
    thresholds = np.asarray(thresholds, dtype=np.float32)
    labels = [str(label) for label in labels]
    outputs = model.output_shape[-1] if hasattr(model, "output_shape") else None
    if thresholds.shape != (len(labels),) or (outputs is not None and outputs != len(labels)):
        raise ValueError(
            f"export_model: the model has {outputs} outputs, but got {len(labels)} labels and "
            f"thresholds of shape {thresholds.shape}; all three must match (one per label)."
        )
    tf.io.gfile.makedirs(export_base)
    version = _next_version(export_base) if version is None else int(version)
    final = posixpath.join(export_base, str(version))
    if tf.io.gfile.exists(final):
        raise FileExistsError(f"{final} already exists: choose another version or remove that folder "
                              "(a served version is never overwritten).")
    staging = posixpath.join(export_base, f".staging-{version}-{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory() as asset_dir:
        with open(posixpath.join(asset_dir, model_files.LABELS_TXT), "w", encoding="utf-8") as out:
            out.write(labels_text(labels))
        with open(posixpath.join(asset_dir, model_files.THRESHOLDS_JSON), "w", encoding="utf-8") as out:
            out.write(model_files.thresholds_json(labels, thresholds))
        with open(posixpath.join(asset_dir, model_files.STORED_IMAGES_JSON), "w", encoding="utf-8") as out:
            out.write(json.dumps(stored.to_json(), indent=2) + "\n")
        with open(posixpath.join(asset_dir, model_files.BACKBONE_JSON), "w", encoding="utf-8") as out:
            out.write(json.dumps(dict(backbone or {}), indent=2) + "\n")
        servable = _Servable(model, labels, thresholds, stored, asset_dir)
        try:
            tf.saved_model.save(servable, staging, signatures={model_files.SIGNATURE_NAME: servable.serve,
                                                               model_files.STORED_SIGNATURE_NAME: servable.serve_stored})
            tf.io.gfile.rename(staging, final)
        except BaseException:
            if tf.io.gfile.exists(staging):
                tf.io.gfile.rmtree(staging)
            raise
    return final
