"""How a dataset stores its images, owned by one class: `StoredImages`.

Its values, their checks, the encoder the pipeline writes with (Pillow), the decoder the trainer
and both serving signatures read with (TensorFlow), the codec round trip the serving signature
applies to a source image, and its JSON (dataset.json's fields and the export's
stored_images.json). Changing how images are stored means changing this module, docs/dataset.md
and their tests; everything else asks a `StoredImages`. TensorFlow and Pillow are imported by the
methods that use them, so the contract stays importable without either.
"""
from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tensorflow as tf
    from PIL import Image

IMAGE_FORMATS = ("jpeg", "png")  # how the stored images are encoded
RESIZE_POLICIES = ("squash", "crop", "pad")
# Chroma subsampling of stored JPEGs; the serving signature re-encodes the same way.
JPEG_SUBSAMPLINGS = ("4:2:0", "4:4:4")
# ImageNet-style backbones take 224-600 px; 4096 is 48 MiB per decoded image.
MAX_IMAGE_SIZE = 4096
PNG_COMPRESS_LEVEL = 1  # 2.5x faster than the default 6 for ~7 % more bytes
# What a dataset.json without a field means: those fields were added later, and datasets written
# before hold 4:4:4 JPEGs.
LEGACY_DEFAULTS = {"jpeg_subsampling": "4:4:4", "jpeg_quality": 95}


@dataclasses.dataclass(frozen=True)
class StoredImages:
    """How a dataset stores its images: what the trainer decodes, what the serving signature
    reproduces, and what `pipelines.predict` needs to make the same bytes from a source image (the
    export carries it as an asset, so a model predicts correctly after its dataset is gone).
    The JPEG fields are recorded whatever the format; they apply to `jpeg` only."""

    image_size: int
    image_format: str  # IMAGE_FORMATS
    resize_policy: str  # RESIZE_POLICIES
    jpeg_quality: int
    jpeg_subsampling: str  # JPEG_SUBSAMPLINGS

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """What is wrong with these values, naming the field, or None."""
        for key, choices in (("image_format", IMAGE_FORMATS), ("resize_policy", RESIZE_POLICIES),
                             ("jpeg_subsampling", JPEG_SUBSAMPLINGS)):
            if getattr(self, key) not in choices:
                return f"{key} {getattr(self, key)!r} is not one of {choices}"
        for key, low, high in (("image_size", 1, MAX_IMAGE_SIZE), ("jpeg_quality", 1, 100)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                return f"{key} must be an int in [{low}, {high}], got {value!r}"
        return None

    @property
    def jpeg(self) -> tuple[int, str] | None:
        """(quality, chroma subsampling) of the stored JPEGs; None when images are PNG."""
        return (self.jpeg_quality, self.jpeg_subsampling) if self.image_format == "jpeg" else None

    # --- JSON: dataset.json's fields and the export's asset --------------------------------------

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, meta: Mapping[str, Any], error: Callable[[str], Exception] = ValueError,
                  defaults: Mapping[str, Any] = LEGACY_DEFAULTS) -> StoredImages:
        """The fields of `meta` (a dataset.json or a stored_images.json); a missing field takes its
        value from `defaults` (what older datasets imply), else it is an `error(message)`."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in meta and f.name not in defaults:
                raise error(f"has no {f.name!r}")
            values[f.name] = meta.get(f.name, defaults.get(f.name))
        try:
            return cls(**values)
        except ValueError as err:
            raise error(str(err)) from None

    @staticmethod
    def codec_identity() -> dict[str, Any]:
        """What of the encoder decides the stored bytes beyond a StoredImages' own values: part of a
        dataset's image fingerprint (pipelines.images.identity), so a change here is never reused."""
        return {"png_compress_level": PNG_COMPRESS_LEVEL}

    # --- Pillow: what the pipeline writes ---------------------------------------------------------

    def encode(self, image: Image.Image) -> bytes:
        """An RGB image of image_size x image_size -> the stored bytes."""
        out = io.BytesIO()
        if self.image_format == "jpeg":
            image.save(out, "JPEG", quality=self.jpeg_quality, subsampling=self.jpeg_subsampling)
        else:
            image.save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL)
        return out.getvalue()

    # --- TensorFlow: what the trainer and the serving signatures read -----------------------------

    def decode(self, data: tf.Tensor) -> tf.Tensor:
        """One stored image (an Example's `image`) -> uint8 [S, S, 3]: how training reads it, and how
        the export's stored-images signature reads what pipelines.predict makes."""
        import tensorflow as tf

        if self.image_format == "jpeg":
            # Pillow's (and serving's) decoder: TF's default fast DCT is off by ~1.3 levels on average.
            image = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
        else:
            image = tf.io.decode_png(data, channels=3)
        return tf.ensure_shape(image, [self.image_size, self.image_size, 3])

    def through_codec(self, image: tf.Tensor) -> tf.Tensor:
        """Float [S, S, 3] in [0, 1] -> the uint8 pixels a dataset file holds: 8-bit, and through the
        JPEG codec when stored as JPEG. A 95-quality round trip moves pixels by 0.8-1.7 levels on
        average; on real photos that shifted an ImageNet MobileNetV2's class probabilities by up to
        0.13 when serving skipped it, and 0.03 when serving reproduces it."""
        import tensorflow as tf

        pixels = tf.cast(tf.round(image * 255.0), tf.uint8)
        if self.jpeg is None:
            return pixels
        encoded = tf.io.encode_jpeg(pixels, quality=self.jpeg_quality,
                                    chroma_downsampling=self.jpeg_subsampling == "4:2:0")
        return self.decode(encoded)
