"""Peak RSS of pipelines.preprocess at N and 10N posters, each in a fresh process.

Each run is `python -m pipelines.preprocess` as a user runs it (DirectRunner), measured with
wait4: peak RSS (ru_maxrss), CPU and wall time. Most of the RSS at small N is the imports (TF,
Beam, TFT: about 0.9 GB), so the growth above it per 1,000 images is reported as well.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from benchmarks.common import Context, format_table, module_main, summary_row

NAME = "preprocess_memory"
TARGET_GROWTH = 1.5


def run(ctx: Context) -> dict[str, Any]:
    counts = (ctx.sizes.memory_n, 10 * ctx.sizes.memory_n)
    runs = {n: ctx.preprocess(ctx.poster_manifest(n), f"posters-{n}").as_dict() for n in counts}
    small, big = (runs[n] for n in counts)
    growth = big["peak_rss_mb"] / small["peak_rss_mb"]
    per_thousand = (big["peak_rss_mb"] - small["peak_rss_mb"]) / (counts[1] - counts[0]) * 1000
    rows = [(n, r["peak_rss_mb"], r["wall_s"], r["cpu_s"], n / r["wall_s"]) for n, r in runs.items()]
    table = format_table(("posters", "peak RSS MB", "wall s", "CPU s", "img/s incl. start-up"), rows,
                         "Peak RSS of `python -m pipelines.preprocess` (fresh process each)")
    table += (f"\ngrowth {growth:.2f}x from {counts[0]:,} to {counts[1]:,} posters; "
              f"{per_thousand:.1f} MB per extra 1,000 posters above the {small['peak_rss_mb']:.0f} MB of the small run")
    summary = [summary_row(f"preprocess peak RSS, {counts[1]:,} vs {counts[0]:,} posters", f"{growth:.2f}x",
                           f"< {TARGET_GROWTH}x", growth < TARGET_GROWTH,
                           f"{small['peak_rss_mb']:.0f} -> {big['peak_rss_mb']:.0f} MB; {per_thousand:.1f} MB per 1,000 images")]
    return {"measured": {"runs": {str(n): r for n, r in runs.items()}, "growth": growth,
                         "mb_per_1000_images": per_thousand}, "summary": summary, "table": table}


def main(argv: Sequence[str] | None = None) -> int:
    return module_main(NAME, argv)


if __name__ == "__main__":
    sys.exit(main())
