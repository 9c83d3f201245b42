"""Training input pipeline: examples/s from the shards (trainer.data.image_dataset) vs the tutorial's tf.data over image files.

Same images (the train split of the throughput datasets: posters 182x268, chips 256x256, and in
the full run photo-size 500x375 images made from pairs of posters, see common.make_photos), same
batch (256), one child process:
- ours: `trainer.data.image_dataset(info, "train", 256)` - TFRecords (uncompressed by default), parse, decode the stored
  JPEG (the pipeline's default size, common.IMAGE_SIZE), batch as uint8, prefetch (the trainer's
  model converts to float itself, on the accelerator when there is one);
- the tutorial's: `from_tensor_slices((paths, labels))`, map(read_file + decode_jpeg + resize to
  the same size + /255, AUTOTUNE), batch, prefetch. Its `.cache()` is left out: it keeps every image as
  float32 (602 KB each, 24 GB for 40k posters) and only helps from the second epoch on.
A pass is several epochs over the split, each with a fresh iterator as a training epoch has (one
epoch here is ~1 s, too short to time: tf.data's autotuning ramps up within it). Passes alternate
between the two; the best pass of each counts (noise only slows a pass).
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import IMAGE_SIZE, Context, Stopwatch, format_table, module_main, read_manifest, summary_row
from tagbeam import dataset

NAME = "input_pipeline"
TARGET_SPEEDUP = 2.0
BATCH = 256


def _tutorial_dataset(paths: list[str], labels: Any):
    import tensorflow as tf

    def parse(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.image.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.image.resize(image, [IMAGE_SIZE, IMAGE_SIZE]) / 255.0, label

    return (tf.data.Dataset.from_tensor_slices((paths, labels))
            .map(parse, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(BATCH)
            .prefetch(tf.data.AUTOTUNE))


def _one_pass(make: Callable[[], Any], epochs: int) -> dict[str, float]:
    examples = 0
    with Stopwatch() as watch:
        for _ in range(epochs):
            for images, _ in make():
                examples += int(images.shape[0])
    return watch.rates(examples)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf

    from trainer import data

    result = {}
    for entry in spec["sets"]:
        info = dataset.read(entry["dataset"])
        ids = [r.numpy().decode() for r in tf.data.TFRecordDataset(list(info.shard_paths("train")), info.compression_type).map(
            lambda s: tf.io.parse_single_example(s, {"id": tf.io.FixedLenFeature([], tf.string)})["id"])]
        by_id = {row.id: row for row in read_manifest(Path(entry["manifest"]))}
        index = {label: i for i, label in enumerate(info.labels)}
        paths = [str(by_id[i].path) for i in ids]
        labels = np.zeros((len(ids), len(index)), np.float32)
        for r, i in enumerate(ids):
            for label in by_id[i].labels:
                if label in index:
                    labels[r, index[label]] = 1.0
        contenders = {"shards (trainer.data.image_dataset)": functools.partial(data.image_dataset, info, "train", BATCH),
                      "tutorial (image files, decode + resize)": functools.partial(_tutorial_dataset, paths, labels)}
        passes: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
        for _ in range(spec["passes"]):
            for name, make in contenders.items():
                passes[name].append(_one_pass(make, spec["epochs"]))
        result[entry["name"]] = {"examples": len(ids), "passes": passes,
                                 "best": {name: max(p, key=lambda r: r["per_s"]) for name, p in passes.items()}}
    return result


def run(ctx: Context) -> dict[str, Any]:
    n = ctx.sizes.throughput_images
    sets = [{"name": kind, "dataset": str(ctx.dataset(kind, n)), "manifest": str(ctx.manifest(kind, n))}
            for kind in ctx.sizes.input_sets]
    measured, process = ctx.child(NAME, {"sets": sets, "passes": ctx.sizes.input_passes,
                                         "epochs": ctx.sizes.input_epochs}, NAME)
    rows, summary = [], []
    for kind, entry in measured.items():
        ours, theirs = (entry["best"][name] for name in entry["best"])
        for name, best in entry["best"].items():
            rows.append((kind, name, entry["examples"], best["per_s"], best["cores_used"], best["per_core_s"]))
        speedup, per_core = ours["per_s"] / theirs["per_s"], ours["per_core_s"] / theirs["per_core_s"]
        entry["speedup"], entry["speedup_per_core"] = speedup, per_core
        summary.append(summary_row(f"input pipeline {kind}: shards vs tutorial tf.data, examples/s", f"{speedup:.2f}x",
                                   f">= {TARGET_SPEEDUP:.0f}x", speedup >= TARGET_SPEEDUP,
                                   f"{ours['per_s']:.0f} vs {theirs['per_s']:.0f} ex/s; per core {per_core:.2f}x"))
    table = format_table(("set", "pipeline", "examples", "examples/s", "cores used", "examples/s per core"), rows,
                         f"Training input pipeline, batch {BATCH}, best of {ctx.sizes.input_passes} pass(es) "
                         f"of {ctx.sizes.input_epochs} epoch(s)")
    return {"measured": {**measured, "process": process.as_dict()}, "summary": summary, "table": table}


def main(argv: Sequence[str] | None = None) -> int:
    return module_main(NAME, argv, child)


if __name__ == "__main__":
    sys.exit(main())
