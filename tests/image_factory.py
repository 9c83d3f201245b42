"""Images as bytes for tests, in one place: encoding an image or array, seeded noise images, and
(from sample_data.hostile, which benchmarks use too) the hostile ones."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sample_data.hostile import png_header, zero_tiff  # noqa: F401 - re-exported: the hostile images

__all__ = ["encode", "noise", "noise_image", "png_header", "zero_tiff"]


def encode(image: Image.Image | np.ndarray, fmt: str, **kwargs) -> bytes:
    """`image` (a Pillow image, or a uint8 array as Image.fromarray reads it) encoded by Pillow as `fmt`."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def noise(seed: int, size: tuple[int, int], channels: int = 3) -> np.ndarray:
    """uint8 noise of `size` (width, height) and `channels`, the same for the same seed."""
    width, height = size
    return (np.random.default_rng(seed).random((height, width, channels)) * 255).astype(np.uint8)


def noise_image(seed: int, size: tuple[int, int], fmt: str = "JPEG", **kwargs) -> bytes:
    """A seeded noise image encoded as `fmt` (RGBA when `fmt` is PNG and kwargs ask for mode="RGBA")."""
    mode = kwargs.pop("mode", "RGB")
    return encode(Image.fromarray(noise(seed, size, len(mode)), mode), fmt, **kwargs)
