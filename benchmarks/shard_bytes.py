"""Bytes per example in the shards vs float32 pixels at the same size (the Google book's format).

Reads the datasets of the throughput and input-pipeline benchmarks (built here if absent): bytes on
disk (as the pipeline stores them, uncompressed by default) and the serialized tf.train.Example size
(TFRecord frames read with struct, no TensorFlow), against float32 and uint8 pixels at the dataset's size (common.IMAGE_SIZE, the
pipeline's default).
"""
from __future__ import annotations

import gzip
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    FLOAT32_BYTES,
    IMAGE_SIZE,
    UINT8_BYTES,
    Context,
    format_table,
    module_main,
    read_json,
    read_manifest,
    summary_row,
)

NAME = "shard_bytes"
TARGET_FRACTION = 1 / 8


def record_lengths(path: Path) -> Iterator[int]:
    """Lengths of the records of a TFRecord file, GZIP or not (length u64, crc u32, data, crc u32)."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            f.seek(length + 4, 1)
            yield length


def measure(dataset: Path, manifest: Path) -> dict[str, Any]:
    info = read_json(dataset / "dataset.json")
    files = [dataset / name for split in info["splits"].values() for name in split["files"]]
    lengths = [n for path in files for n in record_lengths(path)]
    on_disk = sum(path.stat().st_size for path in files)
    sources = [row.path.stat().st_size for row in read_manifest(manifest)]
    return {
        "examples": len(lengths),
        "image_size": info["image_size"], "image_format": info["image_format"], "jpeg_quality": info.get("jpeg_quality"),
        "jpeg_subsampling": info.get("jpeg_subsampling", "4:4:4"),
        "shard_compression": info.get("shard_compression", "gzip"),
        "bytes_on_disk_per_example": on_disk / len(lengths),
        "serialized_bytes_per_example": sum(lengths) / len(lengths),
        "source_jpeg_bytes_per_image": sum(sources) / len(sources),
        "float32_bytes": FLOAT32_BYTES, "uint8_bytes": UINT8_BYTES,
        "fraction_of_float32": on_disk / len(lengths) / FLOAT32_BYTES,
        "fraction_of_float32_serialized": sum(lengths) / len(lengths) / FLOAT32_BYTES,
    }


def run(ctx: Context) -> dict[str, Any]:
    n = ctx.sizes.throughput_images
    measured = {kind: measure(ctx.dataset(kind, n), ctx.manifest(kind, n)) for kind in ctx.sizes.input_sets}
    rows, summary = [], []
    for kind, m in measured.items():
        rows.append((kind, m["examples"], m["source_jpeg_bytes_per_image"], m["serialized_bytes_per_example"],
                     m["bytes_on_disk_per_example"], f"1/{1 / m['fraction_of_float32']:.0f}",
                     f"1/{UINT8_BYTES / m['bytes_on_disk_per_example']:.1f}"))
        summary.append(summary_row(
            f"shard bytes per {kind} example vs float32 {IMAGE_SIZE}x{IMAGE_SIZE}x3", f"1/{1 / m['fraction_of_float32']:.0f}",
            "<= 1/8", m["fraction_of_float32"] <= TARGET_FRACTION,
            f"{m['bytes_on_disk_per_example']:,.0f} B on disk (JPEG q{m['jpeg_quality']} {m['jpeg_subsampling']}, "
            f"shards {m['shard_compression']}) vs {FLOAT32_BYTES:,} B"))
    table = format_table(("set", "examples", "source JPEG B", "Example B (serialized)", "B on disk",
                          "vs float32", "vs uint8"), rows, f"Bytes per example ({IMAGE_SIZE}x{IMAGE_SIZE} RGB)")
    return {"measured": measured, "summary": summary, "table": table}


def main(argv: Sequence[str] | None = None) -> int:
    return module_main(NAME, argv)


if __name__ == "__main__":
    sys.exit(main())
