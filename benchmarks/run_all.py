"""Runs every benchmark of issue 6, prints their tables and a headline table, writes one JSON.

    python -m benchmarks.run_all [--quick] [--out results.json] [--work DIR] [--only a,b] [--skip a,b] [--merge]

--quick: tiny sizes, a smoke test of every code path (about 3 minutes on 2 quiet cores); its
numbers mean nothing. Without it: the sizes in benchmarks/common.py FULL (about 55 minutes on 2 cores, plus
~20 min quiet for `backbones`, 49 min when the machine was shared; benchmarks/README.md section 13).
Large outputs go under --work (default work/bench or work/bench-quick, gitignored). --merge re-runs
the selected benchmarks (say, noisy ones when the machine is quieter) and keeps the others' results
from the existing --out file; every result records when it finished and the load while it ran.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BenchmarkError,
    Context,
    LoadMeter,
    format_table,
    machine_info,
    read_json,
    run_benchmark,
    write_json,
)

# Cheap, dependency-free measurements first; the quality benchmark trains the model serving uses.
BENCHMARKS = ("preprocess_throughput", "shard_bytes", "preprocess_memory", "input_pipeline", "train_time",
              "trainer_overhead", "quality", "serving", "gpu", "retrain_nights", "backbones")


def _names(text: str | None) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"error: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return names


def headline(results: dict[str, Any]) -> str:
    rows = []
    for name, result in results.items():
        if "error" in result:
            rows.append((name, "FAILED", "", "", result["error"].splitlines()[0][:100]))
            continue
        for row in result["summary"]:
            rows.append((row["metric"], row["value"], row["target"], "" if row["met"] is None else row["met"],
                         row["note"]))
    return format_table(("measurement", "value", "target", "met", "detail"), rows, "Headline results")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, numbers mean nothing")
    parser.add_argument("--out", default=None, help="JSON results (default <work>/results.json)")
    parser.add_argument("--work", default=None, help="work folder (default work/bench or work/bench-quick)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--skip", default=None, help="comma-separated benchmarks to leave out")
    parser.add_argument("--merge", action="store_true",
                        help="keep the results of benchmarks not run now from the existing --out file")
    args = parser.parse_args(argv)
    selected = [n for n in (_names(args.only) or BENCHMARKS) if n not in _names(args.skip)]
    ctx = Context.create(args.work, args.quick)
    out = Path(args.out) if args.out else ctx.path("results.json")
    report: dict[str, Any] = {"machine": machine_info(), "quick": ctx.quick, "sizes": dataclasses.asdict(ctx.sizes),
                              "work": str(ctx.work), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": {}}
    if args.merge and out.exists():
        previous = read_json(out)
        if previous.get("quick") != ctx.quick:
            raise SystemExit(f"error: --merge: {out} holds {'quick' if previous.get('quick') else 'full'} results; "
                             "merge only runs of the same mode")
        report["results"] = {k: v for k, v in previous["results"].items() if k not in selected}
        report["merged_from"] = previous.get("merged_from", []) + [previous["started"]]
    print(f"benchmarks ({'quick' if ctx.quick else 'full'}) in {ctx.work}: {', '.join(selected)}", flush=True)
    failed = False
    with LoadMeter() as load:
        ctx.sample()
        for name in selected:
            try:
                report["results"][name] = {**run_benchmark(name, ctx), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            except (BenchmarkError, OSError, KeyError, ValueError) as err:
                failed = True
                report["results"][name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
                print(f"[{name}] FAILED: {err}", file=sys.stderr, flush=True)
            report["preprocess_runs"] = ctx.preprocess_runs
            write_json(out, report)  # after every benchmark: a later failure keeps the finished ones
    report["load"] = load.summary
    write_json(out, report)
    print("\n" + headline({n: report["results"][n] for n in BENCHMARKS if n in report["results"]}))
    m = report["machine"]
    print(f"\nmachine: {m['nproc']} x {m['cpu_model']}, {m['ram_gb']} GB RAM; whole run {load.summary['wall_s']} s, "
          f"machine busy {load.summary['machine_busy_cores']} cores (others {load.summary['others_cores']}), "
          f"load average {load.summary['loadavg1_mean']} (max {load.summary['loadavg1_max']})")
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
