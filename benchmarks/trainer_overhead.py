"""Trainer overhead: `python -m trainer.task` (defaults) vs a bare backbone pass over the same images.

With the frozen backbone (the default) the one heavy piece of work in training is a forward pass
per image; everything else (start-up, fitting the head on cached features, thresholds,
evaluation, export) is overhead. Both contenders are fresh processes on the same posters, one
after the other in one run:
- the trainer: `python -m trainer.task --data_dir <posters> --seed 0` with every other option at
  its default (extraction of every split, head fit until early stopping or the maximum epochs,
  thresholds, test metrics and plots, the SavedModel export);
- the bare pass: import TensorFlow, load the same backbone (`trainer.model.load_backbone`), then
  read every image of the dataset's manifest from its JPEG file, decode, resize to the dataset's
  size, batch 64 and run the backbone forward; nothing else.
The ratio compares whole processes (start-up on both sides). The bare pass runs before and after
the trainer and its mean counts, so load that drifts during the run weighs on both contenders.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import Context, format_table, module_main, read_json, read_manifest, summary_row

NAME = "trainer_overhead"
TARGET_RATIO = 1.25
BARE_BATCH = 64


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """The bare pass, in this process: the images of spec["manifest"] through the backbone."""
    start = time.perf_counter()
    import tensorflow as tf

    from trainer import embedded_backbone
    from trainer import model as model_lib

    size = spec["image_size"]
    paths = [str(row.path) for row in read_manifest(Path(spec["manifest"]))]
    backbone = model_lib.load_backbone(embedded_backbone.default_handle())
    forward = tf.function(backbone.features, input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])

    def load(path: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.cast(tf.image.resize(image, [size, size]), tf.uint8)

    images = (tf.data.Dataset.from_tensor_slices(paths).map(load, num_parallel_calls=tf.data.AUTOTUNE)
              .batch(BARE_BATCH).prefetch(tf.data.AUTOTUNE))
    ready = time.perf_counter()
    count = 0
    for batch in images:
        count += int(forward(batch).shape[0])
    return {"images": count, "start_up_s": ready - start, "loop_s": time.perf_counter() - ready,
            "images_per_s": count / (time.perf_counter() - ready)}


def run(ctx: Context) -> dict[str, Any]:
    n = ctx.sizes.overhead_posters
    data_dir = ctx.dataset("posters", n)
    info = read_json(data_dir / "dataset.json")
    spec = {"manifest": str(ctx.manifest("posters", n)), "image_size": info["image_size"]}
    bare: list[dict[str, Any]] = []

    def bare_pass(i: int) -> None:
        measured, process = ctx.child(NAME, spec, f"{NAME}-bare-{i}")
        bare.append({**measured, "process": process.as_dict()})

    bare_pass(0)
    model_dir, process = ctx.train(f"{NAME}-trainer", data_dir)
    bare_pass(1)
    run_info = read_json(model_dir / "run.json")
    timings = run_info["timings"]
    bare_wall = sum(b["process"]["wall_s"] for b in bare) / len(bare)
    bare_loop = sum(b["loop_s"] for b in bare) / len(bare)
    ratio = process.wall_s / bare_wall
    extraction_ratio = timings["feature_extraction_s"] / bare_loop
    splits = {s: v["examples"] for s, v in info["splits"].items()}
    rows = [(f"bare pass {i + 1}", b["images"], b["process"]["wall_s"], b["process"]["cpu_s"], b["start_up_s"],
             b["loop_s"], "-", b["images_per_s"]) for i, b in enumerate(bare)]
    rows.append(("trainer (defaults, seed 0)", sum(splits.values()), process.wall_s, process.cpu_s, "-",
                 timings["feature_extraction_s"], timings["fit_s"], timings["feature_extraction_images_per_s"]))
    table = format_table(("contender", "images", "wall s", "CPU s", "start-up s", "extraction / forward s", "fit s",
                          "images/s (forward)"), rows,
                         f"Trainer overhead, {n:,} posters ({splits}), {info['image_size']} px, "
                         f"{run_info['epochs_completed']} epochs")
    table += (f"\nwhole trainer / bare pass: {ratio:.3f} ({process.wall_s:.1f} s vs {bare_wall:.1f} s, mean of "
              f"{len(bare)} bare passes); extraction / bare forward loop: {extraction_ratio:.3f}; trainer total_s "
              f"{timings['total_s']:.1f}; test macro-F1 (tuned) {run_info['test_macro_f1_tuned']:.4f}")
    summary = [summary_row(f"trainer whole run / bare backbone pass, {n:,} posters", f"{ratio:.3f}",
                           f"<= {TARGET_RATIO}", ratio <= TARGET_RATIO,
                           f"{process.wall_s:.0f} s vs {bare_wall:.0f} s; extraction {timings['feature_extraction_s']:.0f} s, "
                           f"fit {timings['fit_s']:.1f} s")]
    return {"measured": {"posters": n, "splits": splits, "bare": bare, "trainer": {
                "process": process.as_dict(), "timings": timings, "epochs_completed": run_info["epochs_completed"],
                "val_macro_f1_tuned": run_info["val_macro_f1_tuned"],
                "test_macro_f1_tuned": run_info["test_macro_f1_tuned"]},
                "bare_wall_s": bare_wall, "bare_loop_s": bare_loop, "ratio": ratio,
                "extraction_ratio": extraction_ratio},
            "summary": summary, "table": table}


def main(argv: Sequence[str] | None = None) -> int:
    return module_main(NAME, argv, child)


if __name__ == "__main__":
    sys.exit(main())
