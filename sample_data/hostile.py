"""Hostile images for tests and benchmarks: files that are small on disk and huge decoded."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np


def zero_tiff(shape: tuple[int, int, int], dtype: type | str, tile: int = 256) -> bytes:
    """A zlib-compressed tiled TIFF of zeros of `shape` (height, width, samples), written tile by tile:
    a few MB at most as a file, and little memory while it is made."""
    import tifffile

    out = io.BytesIO()
    height, width, samples = shape
    tiles = -(-height // tile) * -(-width // tile)
    tifffile.imwrite(out, data=(np.zeros((tile, tile, samples), dtype) for _ in range(tiles)), shape=shape,
                     dtype=dtype, tile=(tile, tile), compression="zlib", compressionargs={"level": 1},
                     photometric="minisblack", planarconfig="contig")
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A valid PNG that declares width x height RGB but holds almost no data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
