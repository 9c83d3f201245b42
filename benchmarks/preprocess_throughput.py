"""Preprocessing throughput per core: pipelines.preprocess vs the same work in a bare loop vs decode+resize.

One child process does everything, so the three are measured on the same files in the same run:
- decode limit: read the file, Pillow open + convert("RGB") + resize to the pipeline's default size (bilinear);
- same-work loop: read the file, `pipelines.images.process` with the pipeline's default options,
  the pipeline's tf.train.Example bytes, hash split, an uncompressed TFRecord per split like the
  pipeline's default shards (tf.io.TFRecordWriter);
- the pipeline: `pipelines.preprocess` in-process (FnApiRunner, one worker, local files), the whole
  job (label vocabulary with TFT, then fetch/decode/encode/shard), after a warm-up run.
Per core = images per CPU-second of the process (user + sys, all threads). The loops run before and
after the pipeline and count together, so slow drift in the machine's load hits both sides.
A second pipeline run on `throughput_small` images gives the fixed cost of a run, and so the
marginal (steady-state) rate of the pipeline as well.
"""
from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    IMAGE_SIZE,
    Context,
    Stopwatch,
    format_table,
    module_main,
    read_json,
    read_manifest,
    summary_row,
)

NAME = "preprocess_throughput"
TARGET_RATIO = 0.8
_CONSTRUCTION = re.compile(r"pipeline construction ([\d.]+) s")


def _decode_limit(rows: Sequence[Any]) -> None:
    from PIL import Image

    for row in rows:
        with open(row.path, "rb") as f:
            data = f.read()
        Image.open(io.BytesIO(data)).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)


def _same_work(rows: Sequence[Any], out_dir: Path) -> None:
    import tensorflow as tf

    from pipelines import images, splits
    from tagbeam.dataset import SPLITS, to_example

    options = images.ImageOptions(size=IMAGE_SIZE)
    vocab = {label: i for i, label in enumerate(sorted({label for row in rows for label in row.labels}))}
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {s: tf.io.TFRecordWriter(str(out_dir / f"{s}.tfrecord")) for s in SPLITS}  # uncompressed
    try:
        for row in rows:
            with open(row.path, "rb") as f:
                data = f.read()
            record = to_example(row.id, images.process(data, options), sorted(vocab[label] for label in row.labels),
                                len(vocab))
            writers[splits.split_of(row.id, 0.1, 0.1)].write(record)
    finally:
        for writer in writers.values():
            writer.close()


def _pipeline(manifest: str, output: str) -> dict[str, Any]:
    from pipelines import preprocess

    printed = io.StringIO()
    with Stopwatch() as watch, contextlib.redirect_stdout(printed):
        code = preprocess.main(["--input", manifest, "--output", output, "--overwrite"])
    if code != 0:
        raise RuntimeError(f"pipelines.preprocess failed on {manifest} (exit {code}):\n{printed.getvalue()}")
    info = read_json(Path(output) / "dataset.json")
    examples = sum(s["examples"] for s in info["splits"].values())
    result = {**watch.rates(examples), "input_rows": info["input_rows"], "rejected": info["rejected"]}
    construction = _CONSTRUCTION.search(printed.getvalue())
    if construction:
        result["construction_s"] = float(construction[1])
    return result


def _fetch_costs(rows: Sequence[Any], batch: int = 10) -> dict[str, dict[str, float]]:
    """Reading the same local files three ways: as the pipeline does (`fetch_many` per batch, a thread
    pool each time), with `fetch` inline, and with a plain open/read; to show what the fetch step costs."""
    from pipelines import fetch

    options = fetch.FetchOptions()
    base = str(rows[0].path.parent)
    names = [row.path.name for row in rows]
    out = {}
    with Stopwatch() as out["fetch_many_per_batch"]:
        for i in range(0, len(names), batch):
            fetch.fetch_many(names[i:i + batch], options, base=base)
    with Stopwatch() as out["fetch_inline"]:
        for name in names:
            fetch.fetch(name, options, base)
    with Stopwatch() as out["open_read"]:
        for row in rows:
            with open(row.path, "rb") as f:
                f.read()
    return {key: {**watch.rates(len(rows)), "cpu_ms_per_image": 1000 * watch.cpu_s / len(rows)}
            for key, watch in out.items()}


def _loops(rows: Sequence[Any], scratch: Path) -> dict[str, Stopwatch]:
    watches = {}
    with Stopwatch() as watches["decode_limit"]:
        _decode_limit(rows)
    with Stopwatch() as watches["same_work_loop"]:
        _same_work(rows, scratch)
    return watches


def _combined(first: Stopwatch, second: Stopwatch, images: int) -> dict[str, float]:
    both = Stopwatch()
    both.wall_s, both.cpu_s = first.wall_s + second.wall_s, first.cpu_s + second.cpu_s
    return both.rates(2 * images)


def _profile(manifest: str, output: str, stats_path: Path) -> list[dict[str, Any]]:
    """cProfile of one in-process pipeline run: the top functions by own time (main thread only)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    _pipeline(manifest, output)
    profiler.disable()
    profiler.dump_stats(stats_path)
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    top = []
    for (filename, line, function), (_, calls, own, cumulative, _) in sorted(
            stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:25]:
        where = filename.split("site-packages/")[-1].replace(str(Path.cwd()) + "/", "")
        top.append({"function": f"{where}:{line}({function})", "calls": calls, "own_s": round(own, 3),
                    "cumulative_s": round(cumulative, 3), "own_share": round(own / total, 3)})
    return top


def child(spec: dict[str, Any]) -> dict[str, Any]:
    with Stopwatch() as imports:
        import tensorflow  # noqa: F401 - timed here so that no run below pays for it
        import tensorflow_transform.beam  # noqa: F401

        from pipelines import preprocess  # noqa: F401
    result: dict[str, Any] = {"imports_s": imports.wall_s, "sets": {}}
    scratch = Path(spec["scratch"])
    warm = spec["sets"][0]
    result["warm_up"] = _pipeline(warm["small_manifest"], str(scratch / "warm-up"))
    for data in spec["sets"]:
        rows = read_manifest(Path(data["manifest"]))
        for row in rows:  # page cache: every contender reads warm files
            row.path.read_bytes()
        before = _loops(rows, scratch / "loop")
        small = _pipeline(data["small_manifest"], str(scratch / f"small-{data['name']}"))
        big = _pipeline(data["manifest"], data["output"])
        after = _loops(rows, scratch / "loop")
        entry = {"images": len(rows), "pipeline": big, "pipeline_small": small, "fetch_local": _fetch_costs(rows)}
        for key in before:
            entry[key] = _combined(before[key], after[key], len(rows))
        # Marginal rate: the extra images of the big run over its extra time (fixed costs cancel).
        extra = big["items"] - small["items"]
        extra_wall, extra_cpu = big["wall_s"] - small["wall_s"], big["cpu_s"] - small["cpu_s"]
        entry["pipeline_marginal"] = {"per_s": extra / extra_wall, "cores_used": extra_cpu / extra_wall,
                                      "per_core_s": extra / extra_cpu}
        entry["pipeline_fixed_cpu_s"] = small["cpu_s"] - small["items"] / entry["pipeline_marginal"]["per_core_s"]
        result["sets"][data["name"]] = entry
    if spec.get("profile"):
        first = spec["sets"][0]
        result["profile"] = {"set": first["name"], "stats_file": spec["profile"],
                             "top_own_time": _profile(first["manifest"], str(scratch / "profiled"), Path(spec["profile"]))}
    return result


def run(ctx: Context, profile: bool | None = None) -> dict[str, Any]:
    n, small = ctx.sizes.throughput_images, ctx.sizes.throughput_small
    sets = []
    for kind, manifest, small_manifest in (
            ("posters", ctx.poster_manifest(n), ctx.poster_manifest(small)),
            ("chips", ctx.chip_manifest(n), ctx.chip_manifest(small))):
        sets.append({"name": kind, "manifest": str(manifest), "small_manifest": str(small_manifest),
                     "output": str(ctx.path("datasets", f"{kind}-{n}"))})
    spec = {"sets": sets, "scratch": str(ctx.path("tmp", "throughput")),
            "profile": str(ctx.path("profile", "preprocess-posters.pstats")) if profile or (
                profile is None and not ctx.quick) else None}
    ctx.path("profile").mkdir(exist_ok=True)
    measured, process = ctx.child(NAME, spec, NAME)
    measured["process"] = process.as_dict()
    return report(measured)


def report(measured: dict[str, Any]) -> dict[str, Any]:
    rows, summary = [], []
    for name, entry in measured["sets"].items():
        loop, decode = entry["same_work_loop"]["per_core_s"], entry["decode_limit"]["per_core_s"]
        for label, key in (("decode limit (Pillow decode+resize)", "decode_limit"),
                           ("same-work loop", "same_work_loop"),
                           ("pipeline, whole run", "pipeline"),
                           ("pipeline, marginal (fixed cost removed)", "pipeline_marginal")):
            m = entry[key]
            rows.append((name, label, m["per_s"], m.get("cores_used"), m["per_core_s"], m["per_core_s"] / loop,
                         m["per_core_s"] / decode))
        whole, marginal = entry["pipeline"]["per_core_s"] / loop, entry["pipeline_marginal"]["per_core_s"] / loop
        entry["ratios"] = {"pipeline_vs_loop": whole, "pipeline_marginal_vs_loop": marginal,
                           "pipeline_vs_decode_limit": entry["pipeline"]["per_core_s"] / decode,
                           "loop_vs_decode_limit": loop / decode}
        summary.append(summary_row(
            f"preprocess {name} ({entry['images']} images): pipeline / same-work loop, per core",
            f"{whole:.2f} whole run, {marginal:.2f} marginal", f">= {TARGET_RATIO}", whole >= TARGET_RATIO,
            f"{entry['pipeline']['per_core_s']:.0f} vs {loop:.0f} img/s/core; decode limit {decode:.0f}; "
            f"fixed cost of a run {entry['pipeline_fixed_cpu_s']:.1f} CPU-s"))
    table = format_table(("set", "contender", "img/s", "cores used", "img/s per core", "vs loop", "vs decode limit"),
                         rows, "Preprocessing throughput (per core = images per CPU-second of the process)")
    extra = [f"child start-up (imports of TF, Beam, TFT): {measured['imports_s']:.1f} s, not counted above"]
    for name, entry in measured["sets"].items():
        p = entry["pipeline"]
        if "construction_s" in p:
            extra.append(f"{name}: whole run {p['wall_s']:.1f} s, of which pipeline construction {p['construction_s']:.1f} s; "
                         f"fixed cost of a run "
                         f"{entry['pipeline_fixed_cpu_s']:.1f} CPU-s (from the {entry['pipeline_small']['items']}-image run)")
        f = entry["fetch_local"]
        extra.append(f"{name}: reading the files costs {f['fetch_many_per_batch']['cpu_ms_per_image']:.2f} CPU-ms/image "
                     f"through fetch_many in batches of 10 (the pipeline's way), "
                     f"{f['fetch_inline']['cpu_ms_per_image']:.2f} through fetch() inline, "
                     f"{f['open_read']['cpu_ms_per_image']:.2f} with open().read(); the same-work loop spends "
                     f"{1000 / entry['same_work_loop']['per_core_s']:.2f} CPU-ms/image in all")
    if measured.get("profile"):
        extra.append(f"cProfile of the {measured['profile']['set']} run (main thread), top own time:")
        extra += [f"  {t['own_share']:5.1%} {t['own_s']:7.2f} s {t['calls']:>8} calls  {t['function']}"
                  for t in measured["profile"]["top_own_time"][:15]]
    return {"measured": measured, "summary": summary, "table": table + "\n" + "\n".join(extra)}


def main(argv: Sequence[str] | None = None) -> int:
    return module_main(NAME, argv, child)


if __name__ == "__main__":
    sys.exit(main())
