"""Time to train: the default (frozen backbone features computed once, cached) vs through the frozen backbone every epoch.

Both are `python -m trainer.task` in fresh processes on the same posters dataset with the same
seed, batch size, head and epochs; `--early_stopping_patience` is larger than the epochs, so both
run every epoch under the same (never-firing) learning-rate schedule. The only difference is
`--feature_cache off`, which makes the trainer run every image through the default backbone each epoch (the
tutorial's way). Times are the whole process (start-up, training, threshold tuning, evaluation,
export) and the trainer's own `run.json` timings.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from benchmarks.common import Context, format_table, module_main, read_json, summary_row

NAME = "train_time"
TARGET_SPEEDUP = 10.0
TARGET_F1_GAP = 0.01
ARMS = {"cached features (default)": [], "through the backbone (--feature_cache off)": ["--feature_cache", "off"]}


def run(ctx: Context) -> dict[str, Any]:
    n, epochs = ctx.sizes.train_posters, ctx.sizes.train_epochs
    dataset = ctx.dataset("posters", n)
    info = read_json(dataset / "dataset.json")
    common = ["--epochs", str(epochs), "--early_stopping_patience", str(epochs + 1000),
              "--batch_size", str(ctx.sizes.batch_size)]
    measured = {}
    for i, (arm, flags) in enumerate(ARMS.items()):
        model_dir, process = ctx.train(f"train-time-{i}", dataset, [*common, *flags])
        run_info = read_json(model_dir / "run.json")
        measured[arm] = {"process": process.as_dict(), "training_path": run_info["training_path"],
                         "epochs_completed": run_info["epochs_completed"], "timings": run_info["timings"],
                         "val_macro_f1_tuned": run_info["val_macro_f1_tuned"],
                         "test_macro_f1_tuned": run_info["test_macro_f1_tuned"]}
    cached, through = measured.values()
    speedup = through["process"]["wall_s"] / cached["process"]["wall_s"]
    train_part = lambda m: m["timings"].get("feature_extraction_s", 0.0) + m["timings"]["fit_s"]  # noqa: E731
    speedup_training = train_part(through) / train_part(cached)
    gap = abs(through["val_macro_f1_tuned"] - cached["val_macro_f1_tuned"])
    rows = [(arm, m["training_path"], m["epochs_completed"], m["process"]["wall_s"], m["process"]["cpu_s"],
             m["timings"].get("feature_extraction_s", 0.0), m["timings"]["fit_s"], m["val_macro_f1_tuned"],
             m["test_macro_f1_tuned"], m["process"]["peak_rss_mb"]) for arm, m in measured.items()]
    splits = {s: v["examples"] for s, v in info["splits"].items()}
    table = format_table(("arm", "path", "epochs", "wall s", "CPU s", "extract s", "fit s", "val macro-F1 (tuned)",
                          "test macro-F1 (tuned)", "peak RSS MB"), rows,
                         f"Time to train, {n:,} posters ({splits}), {epochs} epochs, batch {ctx.sizes.batch_size}, seed 0")
    table += (f"\nspeed-up: {speedup:.1f}x whole process, {speedup_training:.1f}x feature extraction + fit; "
              f"val macro-F1 gap {gap:.4f}")
    summary = [summary_row(f"time to train {epochs} epochs on {n:,} posters: cached vs through the backbone",
                           f"{speedup:.1f}x", f">= {TARGET_SPEEDUP:.0f}x", speedup >= TARGET_SPEEDUP,
                           f"{cached['process']['wall_s']:.0f} s vs {through['process']['wall_s']:.0f} s whole process; "
                           f"{speedup_training:.1f}x extraction + fit"),
               summary_row("same val macro-F1 (tuned) within 0.01", f"{gap:.4f}", f"<= {TARGET_F1_GAP}",
                           gap <= TARGET_F1_GAP,
                           f"{cached['val_macro_f1_tuned']:.4f} vs {through['val_macro_f1_tuned']:.4f}")]
    return {"measured": {"posters": n, "epochs": epochs, "splits": splits, "arms": measured, "speedup": speedup,
                         "speedup_training": speedup_training, "val_macro_f1_gap": gap},
            "summary": summary, "table": table}


def main(argv: Sequence[str] | None = None) -> int:
    return module_main(NAME, argv)


if __name__ == "__main__":
    sys.exit(main())
