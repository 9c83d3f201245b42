"""GPU scaling: feature extraction and fine-tuning images/s on 1..N devices, float32 vs mixed precision.

Runs the trainer's own pieces in one child process: `trainer.model.BatchRunner` over the
backbone (extraction, as the cached-feature path runs it) and `FineTuneModel.fit` with the top
backbone variables unfrozen (as --fine_tune_layers trains), each under a MirroredStrategy over
the first k devices, k = 1..N, at float32 and at the mixed policy of the device (mixed_float16 on
GPUs, mixed_bfloat16 on CPUs, which have no fast float16). Images come from the posters dataset's
train split (the stored 384 px JPEGs, decoded by `trainer.data`). Each contender gets one
untimed warm-up (tracing, Grappler, XLA when on) before it is timed.

Devices are every GPU; without one, the CPU split into `nproc` logical devices - which share the
same cores, so on CPU the numbers prove the code path (and show the cost of splitting), not the
scaling of GPUs. Scaling efficiency = images/s on k devices / (k x images/s on 1).
"""
from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.common import Context, format_table, module_main, summary_row

NAME = "gpu"
FINE_TUNE_LAYERS = 30
FINE_TUNE_BATCH = {"CPU": 8, "GPU": 64}  # per replica


def _devices() -> tuple[str, list[str]]:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return "GPU", [d.name for d in tf.config.list_logical_devices("GPU")]
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * len(os.sched_getaffinity(0)))
    return "CPU", [d.name for d in tf.config.list_logical_devices("CPU")]


def _timed(run: Any) -> float:
    run()  # warm-up: tracing and graph optimisation are not throughput
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def child(spec: dict[str, Any]) -> dict[str, Any]:
    kind, devices = _devices()  # before any other TensorFlow work
    import tensorflow as tf
    import tf_keras

    from tagbeam import dataset
    from trainer import data, embedded_backbone
    from trainer import model as model_lib
    from trainer.config import TrainOptions
    from trainer.losses import get_loss

    info = dataset.read(spec["dataset"])
    handle = embedded_backbone.default_handle()
    extraction_batch = TrainOptions().device_extraction_batch(len(devices) if kind == "GPU" else 0)
    mixed = "mixed_float16" if kind == "GPU" else "mixed_bfloat16"
    rows = []
    for precision in ("float32", mixed):
        for k in range(1, len(devices) + 1):
            model_lib.set_precision(precision)
            strategy = tf.distribute.MirroredStrategy(
                devices[:k], cross_device_ops=tf.distribute.NcclAllReduce() if kind == "GPU"
                else tf.distribute.ReductionToOneDevice())
            with strategy.scope():
                backbone = model_lib.load_backbone(handle, trainable=True)
            runner = model_lib.BatchRunner(strategy, backbone.features)
            batches = max(1, spec["images"] // (extraction_batch * k))
            images = data.image_dataset(info, "train", extraction_batch * k).take(batches)
            extract_s = _timed(functools.partial(runner, images))
            extracted = batches * extraction_batch * k

            tune_batch = FINE_TUNE_BATCH[kind] * k
            steps = spec["fine_tune_steps"]
            train = data.image_dataset(info, "train", tune_batch, training=True, seed=0).repeat()
            with strategy.scope():
                head = model_lib.build_head(model_lib.feature_dim(strategy, backbone, info.image_size),
                                            info.num_labels, seed=0)
                model = model_lib.build_classifier(backbone, head, info.image_size, model_lib.FineTuneModel)
                model.configure_fine_tuning(head.trainable_variables, model_lib.top_variables(backbone, FINE_TUNE_LAYERS),
                                            tf_keras.optimizers.Adam(1e-4))
                model.compile(optimizer=tf_keras.optimizers.Adam(1e-3), loss=get_loss("bce", None))
            tune_s = _timed(functools.partial(model.fit, train, epochs=1, steps_per_epoch=steps, verbose=0))
            rows.append({"devices": k, "precision": precision, "extract_images": extracted,
                         "extract_s": extract_s, "extract_per_s": extracted / extract_s,
                         "fine_tune_images": steps * tune_batch, "fine_tune_s": tune_s,
                         "fine_tune_per_s": steps * tune_batch / tune_s})
    model_lib.set_precision("float32")
    return {"device_kind": kind, "devices": devices, "extraction_batch_per_replica": extraction_batch,
            "fine_tune_batch_per_replica": FINE_TUNE_BATCH[kind], "rows": rows}


def run(ctx: Context) -> dict[str, Any]:
    data_dir = ctx.dataset("posters", ctx.sizes.overhead_posters)
    measured, process = ctx.child(NAME, {"dataset": str(data_dir), "images": ctx.sizes.gpu_images,
                                         "fine_tune_steps": ctx.sizes.gpu_fine_tune_steps}, NAME)
    base = {(r["precision"]): r for r in measured["rows"] if r["devices"] == 1}
    table_rows = []
    for r in measured["rows"]:
        one = base[r["precision"]]
        r["extract_efficiency"] = r["extract_per_s"] / (r["devices"] * one["extract_per_s"])
        r["fine_tune_efficiency"] = r["fine_tune_per_s"] / (r["devices"] * one["fine_tune_per_s"])
        table_rows.append((r["devices"], r["precision"], r["extract_per_s"], r["extract_efficiency"],
                           r["fine_tune_per_s"], r["fine_tune_efficiency"]))
    kind = measured["device_kind"]
    table = format_table(("devices", "precision", "extraction images/s", "scaling eff.", "fine-tuning images/s",
                          "scaling eff."), table_rows,
                         f"{kind} scaling ({len(measured['devices'])} {kind} device(s); extraction batch "
                         f"{measured['extraction_batch_per_replica']}/replica, fine-tuning batch "
                         f"{measured['fine_tune_batch_per_replica']}/replica, top {FINE_TUNE_LAYERS} variables)")
    if kind == "CPU":
        table += "\n(CPU logical devices share the same cores: this proves the code path, it does not measure GPU scaling)"
    n = len(measured["devices"])
    top = [r for r in measured["rows"] if r["devices"] == n]
    summary = [summary_row(f"{kind} x{n} {r['precision']}: extraction / fine-tuning images/s",
                           f"{r['extract_per_s']:.1f} / {r['fine_tune_per_s']:.1f}", "", None,
                           f"scaling efficiency {r['extract_efficiency']:.2f} / {r['fine_tune_efficiency']:.2f}")
               for r in top]
    return {"measured": {**measured, "process": process.as_dict()}, "summary": summary, "table": table}


def main(argv: Sequence[str] | None = None) -> int:
    return module_main(NAME, argv, child)


if __name__ == "__main__":
    sys.exit(main())
