"""pipelines.images on images made here with Pillow, numpy and tifffile, and against TF's resize."""
from __future__ import annotations

import io
import pickle
import random
import time
import tracemalloc

import numpy as np
import pytest
import skimage.data
import tifffile
from PIL import Image

from pipelines.images import ImageError, ImageOptions, _decode, pad_geometry, process, resize, to_rgb
from sample_data.hostile import zero_tiff

from image_factory import encode, png_header

RED, BLUE, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
SMALL = ImageOptions(size=32, output_format="png")  # lossless output: exact colours


def pixels(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def halves(left: tuple, right: tuple, size: tuple[int, int] = (40, 20), mode: str = "RGB") -> Image.Image:
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def reason_of(data: bytes, options: ImageOptions = SMALL) -> str:
    with pytest.raises(ImageError) as err:
        process(data, options)
    return err.value.reason


@pytest.mark.parametrize("fmt, kwargs", [
    ("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}),
    ("GIF", {}),
])
def test_formats_decode_to_rgb_with_their_content(fmt, kwargs):
    out = pixels(process(encode(halves(RED, BLUE), fmt, **kwargs), SMALL))
    assert out.shape == (32, 32, 3)
    assert np.abs(out[:, :12] - RED).max() <= 6 and np.abs(out[:, -12:] - BLUE).max() <= 6


def test_animated_gif_gives_its_first_frame():
    first, second = Image.new("RGB", (20, 20), RED), Image.new("RGB", (20, 20), BLUE)
    gif = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    assert (pixels(process(gif, SMALL)) == RED).all()


def test_alpha_and_palette_transparency_are_composited_on_white():
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 128))
    assert np.abs(pixels(process(encode(rgba, "PNG"), SMALL)) - (255, 127, 127)).max() <= 1
    la = halves((0, 0), (0, 255), mode="LA")  # transparent left, opaque black right
    out = pixels(process(encode(la, "PNG"), SMALL))
    assert (out[:, :12] == WHITE).all() and (out[:, -12:] == BLACK).all()
    palette = halves(1, 2, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    out = pixels(process(encode(palette, "PNG", transparency=1), SMALL))  # index 1 (red) is transparent
    assert (out[:, :12] == WHITE).all() and (out[:, -12:] == BLUE).all()
    transparent_gif = pixels(process(encode(palette, "GIF", transparency=1), SMALL))
    assert (transparent_gif[:, :12] == WHITE).all()


def test_grey_bilevel_and_cmyk_modes():
    grey = pixels(process(encode(Image.new("L", (20, 20), 77), "PNG"), SMALL))
    assert (grey == 77).all()
    bilevel = pixels(process(encode(halves(0, 1, mode="1"), "PNG"), SMALL))
    assert (bilevel[:, :12] == BLACK).all() and (bilevel[:, -12:] == WHITE).all()
    cyan = Image.new("CMYK", (20, 20), (255, 0, 0, 0))
    for fmt in ("JPEG", "TIFF"):  # Adobe JPEGs store CMYK inverted; Pillow undoes that
        assert np.abs(pixels(process(encode(cyan, fmt), SMALL)) - (0, 255, 255)).max() <= 3, fmt


def test_sixteen_bit_greyscale_is_stretched_not_clipped():
    ramp = np.tile(np.linspace(0, 4000, 64), (48, 1)).astype(np.uint16)  # a 12-bit range in 16 bits
    png = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    out = pixels(process(png, SMALL))
    # A plain 16-to-8-bit shift would give 0..15; clipping would saturate at 255 almost everywhere.
    assert out[:, 0].max() <= 5 and out[:, -1].min() >= 250 and 100 < out.mean() < 155
    assert (np.diff(out[0, :, 0]) >= 0).all()
    tif = pixels(process(tifffile_bytes(ramp), SMALL))
    assert np.abs(tif - out).max() <= 1  # same rule whichever library reads the samples


def tifffile_bytes(array: np.ndarray, **kwargs) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, array, **kwargs)
    return out.getvalue()


@pytest.mark.parametrize("layout", [
    {"photometric": "minisblack", "planarconfig": "contig"},  # how GDAL writes 4 bands: Pillow refuses it
    {"photometric": "rgb", "extrasamples": [0]},  # Pillow would read it as 8-bit RGB, high bytes only
    {"photometric": "rgb", "planarconfig": "separate", "extrasamples": [0]},
])
def test_planet_four_band_uint16_tif_is_read_as_bgr_nir(layout):
    chip = np.zeros((30, 40, 4), np.uint16)
    chip[..., 0] = 300  # blue: dark
    chip[..., 1] = 1200  # green
    chip[..., 2] = np.linspace(2000, 9000, 40)  # red: bright, rising left to right
    chip[..., 3] = 60000  # NIR: brightest, must not be shown
    if layout.get("planarconfig") == "separate":
        chip = np.moveaxis(chip, -1, 0)
    data = tifffile_bytes(chip, **layout)
    rgb = np.asarray(to_rgb(data, ImageOptions(max_pixels=10**6))).astype(int)
    assert rgb.shape == (30, 40, 3)
    red, green, blue = rgb[..., 0].mean(), rgb[..., 1].mean(), rgb[..., 2].mean()
    assert red > green > blue and rgb[..., 0].max() >= 250  # stretched, in R, G, B order
    assert rgb[0, -1, 0] > rgb[0, 0, 0]
    assert pixels(process(data, SMALL)).shape == (32, 32, 3)


def test_sixteen_bit_tiff_alpha_is_composited_on_white():
    rgba = np.zeros((20, 20, 4), np.uint16)
    rgba[..., 0] = np.linspace(1000, 3000, 20)
    rgba[..., 3] = 65535
    rgba[:, :10, 3] = 0  # left half transparent
    out = np.asarray(to_rgb(tifffile_bytes(rgba, photometric="rgb", extrasamples=[2]),
                            ImageOptions(max_pixels=10**6))).astype(int)
    assert (out[:, :10] == WHITE).all() and out[:, 10:, 2].max() == 0 and out[:, -1, 0].min() >= 250


def test_exif_orientation_is_applied():
    from PIL import ExifTags

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored sideways: display rotated 90 degrees clockwise
    data = encode(halves(RED, BLUE, size=(40, 20)), "JPEG", quality=95, exif=exif.tobytes())
    upright = to_rgb(data, ImageOptions(max_pixels=10**6))
    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[:15].astype(int), np.asarray(upright)[-15:].astype(int)
    assert np.abs(top - RED).max() <= 8 and np.abs(bottom - BLUE).max() <= 8
    out = pixels(process(data, ImageOptions(size=32, policy="pad", output_format="png")))
    assert (out[:, :7] == BLACK).all() and (out[:, -7:] == BLACK).all()  # tall now: bars left and right


def test_decompression_bombs_are_refused_from_the_header():
    start = time.monotonic()
    assert reason_of(png_header(30000, 30000)) == "too_many_pixels"  # over Pillow's own hard limit
    # 81 Mpx: under Pillow's limits, over ours. Decoding would have failed as corrupt or truncated,
    # so this reason also shows that the check ran before any pixel was decoded.
    assert reason_of(png_header(9000, 9000)) == "too_many_pixels"
    assert reason_of(png_header(9000, 9000), ImageOptions(max_pixels=10**8, max_decoded_bytes=10**9)) \
        in ("truncated", "corrupt")
    assert time.monotonic() - start < 0.5
    assert reason_of(encode(Image.new("RGB", (200, 100)), "JPEG"), ImageOptions(max_pixels=19_999)) == "too_many_pixels"
    with pytest.raises(ImageError, match="too_many_pixels"):
        to_rgb(tifffile_bytes(np.zeros((200, 100, 4), np.uint16), photometric="minisblack",
                              planarconfig="contig"), ImageOptions(max_pixels=19_999))


def test_images_too_large_decoded_are_refused_from_the_header_whatever_the_decoder():
    # The two TIFFs of issue 16: under the pixel bound, small files (a few MB at most), 392 MB and 800 MB
    # decoded; before this bound they took a job to 4.9 and 3.9 GB peak RSS.
    planet_like = zero_tiff((7000, 7000, 4), np.uint16)
    many_samples = zero_tiff((2000, 2000, 200), np.uint8)
    assert len(planet_like) < 4 * 2**20 and len(many_samples) < 4 * 2**20
    tracemalloc.start()
    try:
        for data in (planet_like, many_samples):
            with pytest.raises(ImageError) as err:
                process(data, ImageOptions(size=32))
            assert err.value.reason == "too_large_decoded" and "--max_decoded_bytes" in err.value.detail
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20  # refused before any sample was decoded
    # Pillow's formats are held to the same bound, counted as RGBA (what conversion takes): a 200 x 100
    # palette PNG is 80,000 bytes decoded.
    photo = encode(Image.new("P", (200, 100)), "PNG")
    assert reason_of(photo, ImageOptions(size=32, max_decoded_bytes=79_999)) == "too_large_decoded"
    assert pixels(process(photo, ImageOptions(size=32, output_format="png", max_decoded_bytes=80_000))).shape \
        == (32, 32, 3)


@pytest.mark.parametrize("bands, extrasamples", [(4, None), (3, None), (4, [2]), (1, None)],
                         ids=["bgrn", "rgb", "rgba", "grey"])
def test_high_bit_images_reduced_in_blocks_equal_the_documented_stretch(bands, extrasamples):
    # 1,100 rows of 1,000 pixels: several blocks of rows, so block edges are crossed.
    rng = np.random.default_rng(bands)
    chip = rng.integers(200, 9000, (1100, 1000, bands)).astype(np.uint16)
    chip[..., -1] = np.linspace(0, 65535, 1000).astype(np.uint16)  # alpha, or NIR
    if extrasamples:
        data = tifffile_bytes(chip, photometric="rgb", extrasamples=extrasamples)
    elif bands == 1:
        data = tifffile_bytes(chip[..., 0], photometric="minisblack")
    else:
        data = tifffile_bytes(chip, photometric="minisblack", planarconfig="contig")
    colour = chip[..., [2, 1, 0]] if bands == 4 and not extrasamples else (
        chip[..., :3] if bands > 2 else np.repeat(chip, 3, axis=-1))
    values = colour.astype(np.float64)
    low, high = np.percentile(values, (2.0, 98.0))
    expected = np.clip(np.rint((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    if extrasamples:
        alpha = chip[..., -1:].astype(np.float64) / 65535
        expected = np.rint(expected * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(to_rgb(data)), expected)


def test_truncated_and_non_images():
    photo = encode(Image.fromarray(skimage.data.astronaut()).resize((200, 200)), "JPEG", quality=90)
    assert reason_of(photo[: len(photo) // 2]) == "truncated"
    png = encode(Image.fromarray(skimage.data.astronaut()).resize((200, 200)), "PNG")
    assert reason_of(png[: len(png) // 2]) == "truncated"
    assert reason_of(b"<!DOCTYPE html><html><body>Not Found</body></html>") == "not_an_image"
    assert reason_of(bytes(random.Random(0).randrange(256) for _ in range(5000))) == "not_an_image"
    assert reason_of(b"") == "not_an_image"
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"  # a format whose plugin runs Ghostscript
    assert reason_of(eps) == "not_an_image"


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the broken TIFF tags
def test_corrupted_bytes_only_ever_raise_image_error():
    """One bad file must cost one row: random corruptions of every format raise ImageError or decode."""
    base = Image.fromarray(skimage.data.astronaut()).resize((48, 40))
    rng = random.Random(1234)
    samples = [encode(base, "JPEG"), encode(base, "PNG"), encode(base.convert("P"), "GIF"),
               encode(base, "WEBP"), encode(base, "BMP"), encode(base, "TIFF"),
               tifffile_bytes(np.zeros((20, 20, 4), np.uint16), photometric="minisblack", planarconfig="contig")]
    outcomes = {"ok": 0, "error": 0}
    for data in samples:
        for _ in range(40):
            broken = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                broken[rng.randrange(len(broken))] = rng.randrange(256)
            if rng.random() < 0.3:
                broken = broken[: rng.randrange(1, len(broken))]
            try:
                assert pixels(process(bytes(broken), SMALL)).shape == (32, 32, 3)
                outcomes["ok"] += 1
            except ImageError:
                outcomes["error"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0


def test_policy_geometry():
    wide = Image.new("RGB", (200, 100), WHITE)
    pad = pixels(process(encode(wide, "PNG"), ImageOptions(size=32, policy="pad", output_format="png")))
    assert pad_geometry(200, 100, 32) == (32, 16)
    assert (pad[:8] == BLACK).all() and (pad[8:24] == WHITE).all() and (pad[24:] == BLACK).all()

    # Red sides, green centre square: crop keeps only the square; squash keeps everything.
    banner = Image.new("RGB", (300, 100), RED)
    banner.paste((0, 255, 0), (100, 0, 200, 100))
    crop = pixels(process(encode(banner, "PNG"), ImageOptions(size=32, policy="crop", output_format="png")))
    assert (crop == (0, 255, 0)).all()
    squash = pixels(process(encode(banner, "PNG"), ImageOptions(size=30, policy="squash", output_format="png")))
    assert (squash[:, :9] == RED).all() and (squash[:, 12:18] == (0, 255, 0)).all() and (squash[:, -9:] == RED).all()

    assert pad_geometry(375, 500, 224) == (168, 224) and pad_geometry(3, 1000, 224) == (1, 224)
    assert resize(Image.new("RGB", (7, 5)), 16, "pad").size == (16, 16)
    with pytest.raises(ValueError, match="policy"):
        ImageOptions(policy="stretch")


def tf_reference(data: bytes, size: int, policy: str) -> np.ndarray:
    """The serving-side recipe with TF ops. JPEGs must be decoded with INTEGER_ACCURATE: TF's default
    (INTEGER_FAST) differs from libjpeg's accurate IDCT, which Pillow uses, by ~1 grey level on average."""
    import tensorflow as tf

    if tf.io.is_jpeg(data):
        img = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
    else:
        img = tf.io.decode_image(data, channels=3, expand_animations=False)
    height, width = int(img.shape[0]), int(img.shape[1])
    if policy == "crop":
        side = min(height, width)
        img = tf.image.crop_to_bounding_box(img, (height - side) // 2, (width - side) // 2, side, side)
    if policy == "pad":
        new_w, new_h = pad_geometry(width, height, size)
        img = tf.image.resize(img, [new_h, new_w], method="bilinear", antialias=True)
        return tf.image.pad_to_bounding_box(img, (size - new_h) // 2, (size - new_w) // 2, size, size).numpy()
    return tf.image.resize(img, [size, size], method="bilinear", antialias=True).numpy()


def photo_jpeg(width: int, height: int) -> bytes:
    return encode(Image.fromarray(skimage.data.chelsea()).resize((width, height), Image.Resampling.LANCZOS),
                  "JPEG", quality=90)


def test_output_matches_tf_resize_and_is_compact(capsys):
    size = 224  # the limits below were measured at this size; the draft check needs a source >= 4x it
    source = photo_jpeg(500, 375)
    float32_bytes = size * size * 3 * 4
    lines = []
    # 4:2:0 halves colour resolution: its worst pixels sit on sharp colour edges (pad's black border).
    for fmt, sub, max_limit, mean_limit in (("png", "4:2:0", 1.5, 0.5), ("jpeg", "4:4:4", 16.0, 2.0),
                                            ("jpeg", "4:2:0", 20.0, 2.0)):
        for policy in ("squash", "crop", "pad"):
            out = process(source, ImageOptions(size=size, policy=policy, output_format=fmt, jpeg_subsampling=sub))
            diff = np.abs(pixels(out) - tf_reference(source, size, policy))
            lines.append(f"500x375 {fmt:4} {sub} {policy:6}: max {diff.max():5.2f} mean {diff.mean():.3f}, "
                         f"{len(out)} bytes = 1/{float32_bytes / len(out):.0f} of float32")
            assert diff.max() <= max_limit and diff.mean() < mean_limit, lines[-1]
            if fmt == "jpeg":
                assert len(out) * 8 <= float32_bytes

    large = photo_jpeg(2000, 1500)
    assert _decode(large, ImageOptions(max_pixels=10**8), draft_side=2 * size).scale == 2  # draft decoding is really in play
    for policy in ("squash", "crop", "pad"):
        diff = np.abs(pixels(process(large, ImageOptions(size=size, policy=policy, output_format="png")))
                      - tf_reference(large, size, policy))
        lines.append(f"2000x1500 draft png {policy:6}: max {diff.max():5.2f} mean {diff.mean():.3f}")
        assert diff.max() <= 3.0 and diff.mean() < 0.5, lines[-1]
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_jpeg_chroma_subsampling_is_chosen_by_option():
    from PIL import JpegImagePlugin

    source = photo_jpeg(500, 375)
    stored = {sub: process(source, ImageOptions(size=96, jpeg_subsampling=sub)) for sub in ("4:2:0", "4:4:4")}
    assert stored["4:2:0"] == process(source, ImageOptions(size=96))  # the default
    assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(stored["4:2:0"]))) == 2
    assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(stored["4:4:4"]))) == 0
    assert len(stored["4:2:0"]) < len(stored["4:4:4"])
    with pytest.raises(ValueError, match="jpeg_subsampling '4:1:1' is not one of"):
        ImageOptions(jpeg_subsampling="4:1:1")


def test_image_error_and_options_pickle():
    err = pickle.loads(pickle.dumps(ImageError("truncated", "ends early")))
    assert (err.reason, err.detail) == ("truncated", "ends early")
    options = ImageOptions(size=128, policy="pad")
    assert pickle.loads(pickle.dumps(options)) == options
