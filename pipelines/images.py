"""Turns the bytes of any supported image into a small, fixed-size, 8-bit RGB JPEG or PNG.

Decoding follows docs/dataset.md: EXIF orientation applied, alpha composited on white, the first
frame of animations, and more than 8 bits per sample stretched to 8 bits by a per-image rule:
    the RGB samples are mapped linearly so that their 2nd percentile becomes 0 and their 98th
    becomes 255 (one stretch for all channels, so colour balance is kept); if those coincide
    (a flat image) the type's full range is mapped instead (0..65535 -> 0..255).
That suits satellite chips (Planet's 16-bit values sit in a small part of the range and would come
out black under plain scaling). 16-bit RGB PNGs are the exception: Pillow keeps their high byte,
which is also what TensorFlow's decode_png does.

Resizing is bilinear with antialiasing (Pillow's BILINEAR filter widens with the scale, like
`tf.image.resize(..., "bilinear", antialias=True)`), so the trainer's serving signature can do
the same with TF ops. The exact geometry of each policy is in `resize`.

Safety: only the formats below are opened (Pillow plugins such as EPS run external programs), the
pixel count and the decoded size (pixels x samples per pixel x bytes per sample: a 16-bit TIFF with
200 samples per pixel is small as a file and huge decoded) are checked from the header before any
pixel is decoded, high-bit images are reduced in blocks of rows so that the work on them costs a
bounded multiple of their decoded size, and truncated files are errors
(Pillow's LOAD_TRUNCATED_IMAGES is left off). Pillow's own DecompressionBombError is reported as
`too_many_pixels` too. Its DecompressionBombWarning is not turned into an error: that takes
`warnings.catch_warnings`, which is process-global and unsafe in Beam's threaded workers; with the
default `max_pixels` (below Pillow's warning threshold) our header check rejects those images first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipelines.options import PREDICT
from tagbeam.dataset import DRAFT_MARGIN
from tagbeam.flags import group, in_range, option, positive
from tagbeam.stored import IMAGE_FORMATS, JPEG_SUBSAMPLINGS, MAX_IMAGE_SIZE, RESIZE_POLICIES, StoredImages
from trainer.embedded_backbone import BACKBONES
from trainer.embedded_backbone import DEFAULT as DEFAULT_BACKBONE

# Pillow's JPEG opener also returns the multi-picture JPEGs ("MPO") that many phones write.
_PILLOW_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
_TIFF_BITS_PER_SAMPLE = 258
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# JPEG DCT scaling ("draft", as far as tagbeam.dataset.DRAFT_MARGIN allows) starts at sources >= 4x
# the target. Measured against TF on a 2000x1500 photo to 224: margin 2 -> max/mean abs difference
# 1.2/0.28 grey levels (0.9/0.26 without draft), 2.8x faster;
# margin 1 -> 3.8-5.5/0.4-0.5, which is why it is not used.
_STRETCH_PERCENTILES = (2.0, 98.0)
# Raise whenever a change here can change the stored bytes of an image: datasets of an older
# version are then never reused (see `fingerprint`).
IMAGE_CODE_VERSION = 1


class ImageError(Exception):
    """A per-row decode failure: `reason` is a short token for counters, `detail` is for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keeps both fields through pickling (Beam ships these between workers)
        return type(self), (self.reason, self.detail)


@group
class ImageOptions:
    """Images: decoding, resizing and how they are stored."""

    # The size that suits the default backbone (trainer/embedded_backbone.py): above the 224 px that
    # ImageNet backbones are trained at, on purpose: a multi-label image holds several objects, each a
    # fraction of the frame, and at 320-384 each comes nearer the scale the backbone learned
    # (benchmarks/README.md, sections 7 and 13: EfficientNet-Lite0 at 320 beats MobileNetV2 at 384 on
    # held-out posters and chips, at 0.56x its backbone time).
    # Bounded so that what a size implies (decoded, resized and encoded copies of size^2 x 3 bytes per
    # image, times the fetch threads of every worker) is refused up front, not as a MemoryError mid-run.
    size: int = option(BACKBONES[DEFAULT_BACKBONE].image_size, flag="image_size", check=in_range(1, MAX_IMAGE_SIZE),
                       help="side of the stored square images, in pixels")
    policy: str = option("squash", flag="resize_policy", choices=RESIZE_POLICIES,
                         help="squash (ignore the aspect ratio), crop (centre square) or pad (letterbox on black)")
    output_format: str = option("jpeg", flag="image_format", choices=IMAGE_FORMATS,
                                help="how the stored images are encoded (png: lossless)")
    jpeg_quality: int = option(95, check=in_range(1, 100), help="quality of the stored JPEGs")
    # 4:2:0 by default: web photos, posters and Planet/BigEarthNet JPEG chips are 4:2:0 already, so a
    # source no larger than the stored size has no finer colour to keep; 4:2:0 takes ~20 % fewer
    # bytes and ~25 % less CPU to decode in every training read (benchmarks/README.md). The serving
    # signature re-encodes the same way (trainer/serving.py), and TF's and Pillow's libjpeg-turbo
    # give identical pixels for either choice.
    jpeg_subsampling: str = option("4:2:0", choices=JPEG_SUBSAMPLINGS,
                                   help="chroma subsampling of the stored JPEGs (4:2:0, as most source JPEGs are)")
    max_pixels: int = option(50_000_000, flag="max_image_pixels", check=positive, tags=[PREDICT],
                             help="refuse images with more pixels, checked from the header (decompression bombs)")
    # What one decode may hold, whatever the format: 200 MiB admits every 8-bit image of up to 4 bands
    # under the default pixel bound, and is the memory a worker must afford per decoding thread.
    max_decoded_bytes: int = option(200 * 2**20, check=positive, tags=[PREDICT],
                                    help="refuse images whose decoded samples (width x height x samples per "
                                         "pixel x bytes per sample, from the header; at least 4 samples, as "
                                         "conversion to RGB(A) takes) would take more memory")

    @property
    def stored(self) -> StoredImages:
        """How images made with these options are stored (tagbeam.stored owns that format)."""
        return StoredImages(self.size, self.output_format, self.policy, self.jpeg_quality, self.jpeg_subsampling)

    def storing(self, stored: StoredImages) -> ImageOptions:
        """These decoding bounds, storing images as `stored` says (pipelines.predict: an export's)."""
        return dataclasses.replace(self, size=stored.image_size, output_format=stored.image_format,
                                   policy=stored.resize_policy, jpeg_quality=stored.jpeg_quality,
                                   jpeg_subsampling=stored.jpeg_subsampling)


def identity(options: ImageOptions) -> dict[str, Any]:
    """Everything that makes the stored bytes of an image from its source bytes: every option (the
    decoding bounds too: they decide which images are accepted), the constants and version of this
    module and the libraries doing the work. Two runs with the same identity store the same bytes
    for the same source (pipelines/reuse.py hashes it into a dataset's image_fingerprint)."""
    import PIL
    import tifffile

    return {"options": dataclasses.asdict(options), "code": IMAGE_CODE_VERSION, "draft_margin": DRAFT_MARGIN,
            **StoredImages.codec_identity(), "stretch_percentiles": list(_STRETCH_PERCENTILES),
            "pillow": PIL.__version__, "numpy": np.__version__, "tifffile": tifffile.__version__}


def to_rgb(data: bytes, options: ImageOptions | None = None) -> Image.Image:
    """Decodes `data` into an 8-bit RGB image (rules in the module docstring) within the bounds of
    `options` (only its max_pixels and max_decoded_bytes apply; default: their declared defaults). Raises ImageError."""
    options = options if options is not None else ImageOptions()
    with _as_image_errors():
        return _decode(data, options, draft_side=None).image


def process(data: bytes, options: ImageOptions) -> bytes:
    """Decodes, resizes by `options.policy` and encodes as `options.output_format`. Raises ImageError."""
    with _as_image_errors():
        decoded = _decode(data, options, draft_side=DRAFT_MARGIN * options.size)
        resized = _resize(decoded, options.size, options.policy)
        return options.stored.encode(resized)


def resize(img: Image.Image, size: int, policy: str) -> Image.Image:
    """Resizes an RGB image to `size` x `size`:
    - squash: both sides to `size`, aspect ratio ignored;
    - crop: the centred square of side min(w, h) (offsets rounded down), then resized;
    - pad: the longer side to `size`, the shorter to round(short * size / long) (halves up, at
      least 1), pasted at offset ((size - w') // 2, (size - h') // 2) on black.
    """
    return _resize(_Decoded(img, img.size, 1), size, policy)


def pad_geometry(width: int, height: int, size: int) -> tuple[int, int]:
    """The (width, height) an image takes inside the `pad` square, in integer arithmetic only
    (float rounding would let Beam and TF disagree by a pixel)."""
    long_side, short_side = max(width, height), min(width, height)
    scaled = max(1, (2 * short_side * size + long_side) // (2 * long_side))
    return (size, scaled) if width >= height else (scaled, size)


@dataclasses.dataclass(frozen=True)
class _Decoded:
    image: Image.Image  # RGB; 1/scale of the source size when JPEG draft decoding was used
    source_size: tuple[int, int]
    scale: int


def _resize(decoded: _Decoded, size: int, policy: str) -> Image.Image:
    width, height = decoded.source_size
    if policy == "squash":
        return _resample(decoded, (0, 0, width, height), (size, size))
    if policy == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return _resample(decoded, (left, top, left + side, top + side), (size, size))
    if policy == "pad":
        new_w, new_h = pad_geometry(width, height, size)
        canvas = Image.new("RGB", (size, size))
        canvas.paste(_resample(decoded, (0, 0, width, height), (new_w, new_h)),
                     ((size - new_w) // 2, (size - new_h) // 2))
        return canvas
    raise ValueError(f"unknown resize policy {policy!r}; expected one of {RESIZE_POLICIES}")


def _resample(decoded: _Decoded, region: tuple[int, int, int, int], out_size: tuple[int, int]) -> Image.Image:
    """Bilinear resize of `region` (source pixels) to `out_size`, reading no pixel outside it.

    Pillow's filter would read past a `box` up to the image edge, where TF (crop, then resize)
    clamps at the crop, so the region is cropped first. With draft decoding the region is
    fractional in decoded pixels (a 375-row source decodes to 188 rows at 1/2, of which 187.5 are
    the image); passing that fraction as `box` keeps the geometry exact (ignoring it costs a max
    difference of ~10 grey levels against TF on such images).
    """
    img, scale = decoded.image, decoded.scale
    x0, y0, x1, y1 = (v / scale for v in region)
    crop = (math.floor(x0), math.floor(y0), min(math.ceil(x1), img.width), min(math.ceil(y1), img.height))
    if crop != (0, 0, img.width, img.height):
        img = img.crop(crop)
    box = (x0 - crop[0], y0 - crop[1], x1 - crop[0], y1 - crop[1])
    return img.resize(out_size, Image.Resampling.BILINEAR, box=box, reducing_gap=None)


def _decode(data: bytes, limits: ImageOptions, draft_side: int | None) -> _Decoded:
    try:
        img = Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
    except UnidentifiedImageError:
        if data[:4] in _TIFF_MAGIC:  # e.g. Planet's 4-band uint16 chips, which Pillow refuses
            return _whole(_tiff_rgb(data, limits))
        raise ImageError("not_an_image", f"not a {'/'.join(_PILLOW_FORMATS)} image "
                                         f"(starts with {data[:16]!r})") from None
    _check_pixels(img.size, limits.max_pixels)
    if img.format == "TIFF" and _max_bits(img) > 8:
        return _whole(_tiff_rgb(data, limits))  # Pillow would keep only the high byte
    bytes_per_sample = 4 if img.mode in ("I", "F") else 2 if img.mode.startswith("I;16") else 1
    # At least 4 samples: a palette, bilevel or grey image is converted to RGB(A) before anything else.
    _check_decoded_bytes(img.size, max(4, len(img.getbands())), bytes_per_sample, limits.max_decoded_bytes)
    source_size, scale = img.size, 1
    upright = img.getexif().get(ExifTags.Base.Orientation, 1) == 1
    # Draft only upright JPEGs: a rotation would move the fractional edge the geometry relies on.
    if draft_side and upright and img.format in ("JPEG", "MPO"):
        drafted = img.draft(None, (draft_side, draft_side))
        if drafted:
            scale = round(source_size[0] / drafted[1][2])
    ImageOps.exif_transpose(img, in_place=True)
    if scale == 1:
        source_size = img.size  # after any rotation
    return _Decoded(_rgb(img), source_size, scale)


def _whole(img: Image.Image) -> _Decoded:
    return _Decoded(img, img.size, 1)


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode in _HIGH_BIT_MODES:
        return Image.fromarray(_to_uint8(np.asarray(img)), "L").convert("RGB")
    if img.has_transparency_data:
        return _on_white(img.convert("RGBA"))
    return img.convert("RGB")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError("too_many_pixels", f"{width} x {height} = {width * height} pixels is over the "
                                            f"limit of {max_pixels} (a decompression bomb, or raise the limit)")


def _check_decoded_bytes(size: tuple[int, int], samples: int, bytes_per_sample: int, limit: int) -> None:
    width, height = size
    decoded = width * height * samples * bytes_per_sample
    if decoded > limit:
        raise ImageError("too_large_decoded", f"{width} x {height} pixels x {samples} samples x {bytes_per_sample} "
                                              f"bytes = {decoded} bytes decoded is over the limit of {limit} "
                                              "(--max_decoded_bytes; raise it if such images are expected)")


def _max_bits(img: Image.Image) -> int:
    bits = img.tag_v2.get(_TIFF_BITS_PER_SAMPLE, 8)
    return max(bits) if isinstance(bits, tuple) else int(bits)


def _on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


# Rows are reduced to 8 bits in blocks of about this many samples: the float64 arithmetic of the
# stretch would otherwise hold 8 bytes per sample (4x a 16-bit image) several times over.
_BLOCK_SAMPLES = 2**20


def _stretch_range(samples: np.ndarray) -> tuple[float, float]:
    """The input range of the per-image stretch of the module docstring."""
    low, high = (float(v) for v in np.percentile(samples, _STRETCH_PERCENTILES))
    if high <= low:
        low = 0.0
        high = float(np.iinfo(samples.dtype).max) if samples.dtype.kind in "ui" else 1.0
    return low, high


def _to_uint8(samples: np.ndarray, stretch: tuple[float, float] | None = None) -> np.ndarray:
    """`samples` stretched to 8 bits by `stretch` (low, high), by default their own range."""
    if samples.dtype == np.uint8:
        return samples
    low, high = stretch or _stretch_range(samples)
    out = np.empty(samples.shape, np.uint8)
    for rows in _row_blocks(samples):
        out[rows] = np.clip(np.rint((samples[rows].astype(np.float64) - low) * (255.0 / (high - low))), 0, 255)
    return out


def _row_blocks(array: np.ndarray) -> Iterator[slice]:
    step = max(1, _BLOCK_SAMPLES // max(1, array[:1].size))
    for start in range(0, len(array), step):
        yield slice(start, start + step)


def _tiff_rgb(data: bytes, limits: ImageOptions) -> Image.Image:
    """TIFFs Pillow cannot read or would reduce: more than 8 bits per sample, or 4-band chips.

    Bands: 1 = grey; 2 = grey + alpha; 3 = RGB; 4 = RGB + alpha when the file marks an alpha
    sample, otherwise Planet's B, G, R, NIR order (NIR dropped).
    """
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            if not all(isinstance(v, int) for v in (page.imagewidth, page.imagelength, page.imagedepth)):
                raise ImageError("corrupt", "TIFF header has no single image width, height and depth")
            _check_pixels((page.imagewidth, page.imagelength), limits.max_pixels)
            _check_decoded_bytes((page.imagewidth, page.imagelength * page.imagedepth), page.samplesperpixel,
                                 max(1, -(-page.bitspersample // 8)), limits.max_decoded_bytes)
            samples = page.asarray()
            axes, photometric, extra = page.axes, page.photometric, tuple(page.extrasamples)
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 - tifffile fails on malformed files with any type
        if "imagecodecs" in str(err):
            raise ImageError("unsupported", f"TIFF compression needs the imagecodecs package: {err}") from None
        raise ImageError("corrupt", f"TIFF: {type(err).__name__}: {err}") from None
    if "S" in axes:
        samples = np.moveaxis(samples, axes.index("S"), -1)
    else:
        samples = samples[..., np.newaxis]
    bands = samples.shape[-1]
    if samples.ndim != 3 or photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB) \
            or not 1 <= bands <= 4 or samples.dtype.kind not in "buif":
        raise ImageError("unsupported", f"TIFF layout {samples.shape} {samples.dtype} ({axes}, photometric "
                                        f"{photometric!r}) is not grey, RGB or 4-band BGRN")
    has_alpha = bands in (2, 4) and len(extra) > 0 and extra[0] in (
        tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA)
    if samples.dtype == np.bool_:
        samples = samples.astype(np.uint8) * np.uint8(255)  # what the stretch makes of 0/1 images
    # The stretch's percentiles do not depend on the order of the bands (B, G, R -> R, G, B below);
    # grey is shown as three equal bands, whose percentiles are those of the band repeated.
    colour_samples = samples[..., :3] if bands > 2 else np.repeat(samples[..., :1], 3, axis=-1)
    stretch = None if samples.dtype == np.uint8 else _stretch_range(colour_samples)
    del colour_samples
    rgb = np.empty(samples.shape[:2] + (3,), np.uint8)
    for rows in _row_blocks(samples):
        block = samples[rows]
        if bands == 4 and not has_alpha:
            colour = block[..., [2, 1, 0]]
        else:
            colour = np.repeat(block[..., :1], 3, axis=-1) if bands <= 2 else block[..., :3]
        rgb[rows] = _to_uint8(colour, stretch)
        if has_alpha:
            alpha = block[..., -1:].astype(np.float64)
            if samples.dtype.kind in "ui":
                alpha /= np.iinfo(samples.dtype).max
            alpha = np.clip(alpha, 0.0, 1.0)
            rgb[rows] = np.rint(rgb[rows] * alpha + 255.0 * (1.0 - alpha))
    return Image.fromarray(rgb, "RGB")


@contextlib.contextmanager
def _as_image_errors() -> Iterator[None]:
    """Maps what Pillow and tifffile raise on bad input to ImageError, so one bad file costs one
    row, not the bundle. Programming errors (TypeError, AttributeError...) still propagate."""
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError("too_many_pixels", str(err)) from None
    except UnidentifiedImageError as err:
        raise ImageError("not_an_image", str(err)) from None
    except EOFError as err:
        raise ImageError("truncated", f"file ends early: {err}") from None
    except OSError as err:
        reason = "truncated" if "truncated" in str(err) else "corrupt"
        raise ImageError(reason, str(err)) from None
    except (SyntaxError, ValueError, struct.error, zlib.error) as err:
        raise ImageError("corrupt", f"{type(err).__name__}: {err}") from None
