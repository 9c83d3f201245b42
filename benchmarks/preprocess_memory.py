"""Peak RSS of pipelines.preprocess at N and 10N posters, and at N posters plus hostile images, each
in a fresh process.

Each run is `python -m pipelines.preprocess` as a user runs it (DirectRunner), measured with
wait4: peak RSS (ru_maxrss), CPU and wall time. Most of the RSS at small N is the imports (TF,
Beam, TFT: about 0.9 GB), so the growth above it per 1,000 images is reported as well.

Hostile images (issue 16): files that are small on disk and huge decoded - a 16-bit 4-band TIFF of
7000 x 7000 (under the pixel bound, 392 MB decoded), a TIFF of 2000 x 2000 with 200 samples per pixel,
a PNG whose header claims 30000 x 30000 - several rows of each. A separate run adds instead a few of
the largest image the decoded-size bound admits (16-bit 4-band 5000 x 5000, 200 MB decoded), which is
what one decoding thread may really have to hold.
"""
from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import Context, format_table, module_main, summary_row
from sample_data.hostile import png_header, zero_tiff

NAME = "preprocess_memory"
TARGET_GROWTH = 1.5
HOSTILE_COPIES = 8


def _with_extra_images(ctx: Context, count: int, name: str, images: dict[str, bytes]) -> Path:
    """The first `count` posters' manifest plus HOSTILE_COPIES rows of each of `images`, written under
    the posters' folder (relative paths may not leave the manifest's folder)."""
    base = ctx.poster_manifest(count)
    folder = base.parent / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    lines = [base.read_text()]
    for kind, data in images.items():
        suffix = "png" if data.startswith(b"\x89PNG") else "tif"
        for copy in range(HOSTILE_COPIES):
            file = folder / f"{kind}-{copy}.{suffix}"
            file.write_bytes(data)
            lines.append(f"{name}-{kind}-{copy},,{kind},1.0,Drama,{name}/{file.name}\n")
    manifest = base.with_name(f"bench-{count}-{name}.csv")
    manifest.write_text("".join(lines))
    return manifest


def run(ctx: Context) -> dict[str, Any]:
    counts = (ctx.sizes.memory_n, 10 * ctx.sizes.memory_n)
    runs = {str(n): ctx.preprocess(ctx.poster_manifest(n), f"posters-{n}").as_dict() for n in counts}
    small, big = (runs[str(n)] for n in counts)
    growth = big["peak_rss_mb"] / small["peak_rss_mb"]
    per_thousand = (big["peak_rss_mb"] - small["peak_rss_mb"]) / (counts[1] - counts[0]) * 1000
    hostile = {"tiff_7000px_16bit_4band": zero_tiff((7000, 7000, 4), "uint16"),
               "tiff_2000px_200samples": zero_tiff((2000, 2000, 200), "uint8"),
               "png_header_30000px": png_header(30000, 30000)}
    admitted = {"tiff_5000px_16bit_4band": zero_tiff((5000, 5000, 4), "uint16")}
    for name, images in (("hostile", hostile), ("admitted", admitted)):
        runs[name] = ctx.preprocess(_with_extra_images(ctx, counts[0], name, images), f"posters-{counts[0]}-{name}").as_dict()
    hostile_ratio = runs["hostile"]["peak_rss_mb"] / small["peak_rss_mb"]
    admitted_ratio = runs["admitted"]["peak_rss_mb"] / small["peak_rss_mb"]
    labels = {str(counts[0]): f"{counts[0]:,} posters", str(counts[1]): f"{counts[1]:,} posters",
              "hostile": f"{counts[0]:,} posters + {HOSTILE_COPIES} x 3 hostile images",
              "admitted": f"{counts[0]:,} posters + {HOSTILE_COPIES} x the largest admitted image"}
    rows = [(labels[k], r["peak_rss_mb"], r["wall_s"], r["cpu_s"]) for k, r in runs.items()]
    table = format_table(("run", "peak RSS MB", "wall s", "CPU s"), rows,
                         "Peak RSS of `python -m pipelines.preprocess` (fresh process each)")
    table += (f"\ngrowth {growth:.2f}x from {counts[0]:,} to {counts[1]:,} posters; "
              f"{per_thousand:.1f} MB per extra 1,000 posters above the {small['peak_rss_mb']:.0f} MB of the small run"
              f"\nhostile images {hostile_ratio:.2f}x, largest admitted images {admitted_ratio:.2f}x the ordinary run")
    summary = [summary_row(f"preprocess peak RSS, {counts[1]:,} vs {counts[0]:,} posters", f"{growth:.2f}x",
                           f"< {TARGET_GROWTH}x", growth < TARGET_GROWTH,
                           f"{small['peak_rss_mb']:.0f} -> {big['peak_rss_mb']:.0f} MB; {per_thousand:.1f} MB per 1,000 images"),
               summary_row("preprocess peak RSS, with hostile images vs without", f"{hostile_ratio:.2f}x",
                           f"< {TARGET_GROWTH}x", hostile_ratio < TARGET_GROWTH,
                           f"{small['peak_rss_mb']:.0f} -> {runs['hostile']['peak_rss_mb']:.0f} MB; largest admitted "
                           f"image: {runs['admitted']['peak_rss_mb']:.0f} MB ({admitted_ratio:.2f}x)")]
    return {"measured": {"runs": runs, "growth": growth, "mb_per_1000_images": per_thousand,
                         "hostile_ratio": hostile_ratio, "admitted_ratio": admitted_ratio},
            "summary": summary, "table": table}


def main(argv: Sequence[str] | None = None) -> int:
    return module_main(NAME, argv)


if __name__ == "__main__":
    sys.exit(main())
