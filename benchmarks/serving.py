"""Serving: images/s of the exported SavedModel from JPEG bytes, batch 1 and batch 32, on CPU.

The model is the quality benchmark's default recipe (trained here if absent). A fresh process
loads it with `tf.saved_model.load` (timed), warms each batch size up once, then calls the
`serving_default` signature on held-out poster JPEG bytes: decode, resize, the JPEG round trip
that reproduces the training pixels, the default backbone, head, thresholds.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import Context, Stopwatch, format_table, module_main, read_json, read_manifest, summary_row
from benchmarks.quality import default_model

NAME = "serving"
BATCHES = (1, 32)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    with Stopwatch() as load:
        import tensorflow as tf

        serve = tf.saved_model.load(spec["export"]).signatures["serving_default"]
    images = [row.path.read_bytes() for row in read_manifest(Path(spec["heldout"]))]
    result: dict[str, Any] = {"load_s": load.wall_s}
    for batch, calls in zip(BATCHES, (spec["single_calls"], spec["batch_calls"]), strict=True):
        inputs = [tf.constant([images[(i * batch + j) % len(images)] for j in range(batch)]) for i in range(calls)]
        with Stopwatch() as first:
            serve(image_bytes=inputs[0])
        latencies = []
        with Stopwatch() as watch:
            for x in inputs:
                start = time.perf_counter()
                serve(image_bytes=x)["probabilities"].numpy()
                latencies.append(1000 * (time.perf_counter() - start))
        result[f"batch_{batch}"] = {**watch.rates(batch * calls), "calls": calls, "first_call_s": first.wall_s,
                                    "latency_ms_p50": float(np.percentile(latencies, 50)),
                                    "latency_ms_p95": float(np.percentile(latencies, 95))}
    return result


def run(ctx: Context) -> dict[str, Any]:
    model_dir = default_model(ctx)
    export = read_json(model_dir / "run.json")["export_path"]
    spec = {"export": export, "heldout": str(ctx.heldout_manifest()),
            "single_calls": ctx.sizes.serving_single_calls, "batch_calls": ctx.sizes.serving_batch_calls}
    measured, process = ctx.child(NAME, spec, NAME)
    measured.update({"export": export, "process": process.as_dict()})
    rows = [(batch, measured[f"batch_{batch}"]["calls"], measured[f"batch_{batch}"]["per_s"],
             measured[f"batch_{batch}"]["cores_used"], measured[f"batch_{batch}"]["per_core_s"],
             measured[f"batch_{batch}"]["latency_ms_p50"], measured[f"batch_{batch}"]["latency_ms_p95"],
             measured[f"batch_{batch}"]["first_call_s"]) for batch in BATCHES]
    table = format_table(("batch", "calls", "images/s", "cores used", "images/s per core", "p50 ms/call",
                          "p95 ms/call", "first call s"), rows,
                         f"Serving the exported SavedModel from JPEG bytes (load {measured['load_s']:.1f} s incl. TF import)")
    summary = [summary_row(f"serving images/s, batch {batch} (CPU)", round(measured[f"batch_{batch}"]["per_s"], 1),
                           note=f"p50 {measured[f'batch_{batch}']['latency_ms_p50']:.0f} ms per call")
               for batch in BATCHES]
    return {"measured": measured, "summary": summary, "table": table}


def main(argv: Sequence[str] | None = None) -> int:
    return module_main(NAME, argv, child)


if __name__ == "__main__":
    sys.exit(main())
