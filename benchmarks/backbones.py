"""Backbones: held-out quality of each embedded backbone's frozen features, and its speed, side by side.

For every (backbone, stored image size) the child process makes each image's stored bytes with the
pipeline's own code (`pipelines.images.process`, the defaults but for the size), decodes them as
training does (`tagbeam.stored.StoredImages.decode`), and extracts the features once (batch 32; for val and
test also those of the mirrored image, for flip test-time augmentation). Then, per seed, it trains
the trainer's default head on them (`trainer.model.build_head`: linear, BCE from logits, Adam 1e-3,
batch 256, early stopping and LR halving on val loss with the trainer's cached-path patience),
tunes per-label thresholds on val (`trainer.thresholds`) and scores the held-out set
(`trainer.evaluation`): macro-F1 at the tuned thresholds and macro AP.

- posters: train/val from the sample's train-side posters; test = held-out posters (mosaics of
  Fashion-MNIST's TEST split, never seen in training);
- chips: `make_chips` variants of the real BigEarthNet chips, split by SOURCE chip (every variant of
  a chip in one split: no near-duplicates across splits); labels with fewer than 2 positives in
  any split are left out.

Concatenations of two configurations' features (cost: both passes) are scored the same way.
Speed: every configuration timed on the same real images, round-robin (so machine load hits them
alike), best of the rounds; `GMAdds` are the published multiply-adds scaled by pixel count.
"""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import PYTHON, Context, format_table, module_main, read_manifest, run_child, summary_row

NAME = "backbones"
BATCH = 32
# The target: +2 points of macro-F1 and mAP on held-out posters over today's default, at
# no more than its backbone cost per image, chips no worse.
TODAYS_DEFAULT = "mobilenet_v2@384"
TARGET_GAIN = 0.02
# Published multiply-adds at the training resolution (torchvision; tensorflow/tpu EfficientNet-Lite README).
GMADDS = {"mobilenet_v2": (0.30, 224), "efficientnet_lite0": (0.41, 224), "efficientnet_lite1": (0.63, 240),
          "efficientnet_lite2": (0.90, 260)}


def configurations(ctx: Context) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(backbone, size) pairs, and the pairs of them whose concatenated features are also scored."""
    if ctx.quick:
        return [("mobilenet_v2", 128), ("efficientnet_lite0", 128)], [("mobilenet_v2@128", "efficientnet_lite0@128")]
    configs = [("mobilenet_v2", 224), ("mobilenet_v2", 260), ("mobilenet_v2", 384), ("efficientnet_lite0", 224),
               ("efficientnet_lite0", 320), ("efficientnet_lite1", 240), ("efficientnet_lite1", 384),
               ("efficientnet_lite2", 260), ("efficientnet_lite2", 384)]
    return configs, [("mobilenet_v2@224", "efficientnet_lite0@224"), ("mobilenet_v2@260", "efficientnet_lite2@260")]


def _source_chip(chip_id: str) -> str:
    return chip_id.split("_x", 1)[0]  # make_chips names variants <source id>_x<dx>_y<dy>_d<d>


def _splits(ctx: Context) -> dict[str, dict[str, list[tuple[str, tuple[str, ...]]]]]:
    """{"posters"|"chips": {"train"|"val"|"test": [(image path, labels)]}}."""
    s = ctx.sizes
    posters = read_manifest(ctx.poster_manifest(s.backbone_posters + s.backbone_val))
    heldout = read_manifest(ctx.heldout_manifest())[: s.backbone_heldout]
    chips = read_manifest(ctx.chip_manifest(s.backbone_chips))
    sources = sorted({_source_chip(row.id) for row in chips})
    # Every fifth source chip to val, the next fifth to test: 60 % / 20 % / 20 % of the chips.
    role = {source: ("val", "test", "train", "train", "train")[i % 5] for i, source in enumerate(sources)}

    def rows(manifest_rows: Sequence) -> list[tuple[str, tuple[str, ...]]]:
        return [(str(row.path), row.labels) for row in manifest_rows]

    return {
        "posters": {"train": rows(posters[: s.backbone_posters]), "val": rows(posters[s.backbone_posters:]),
                    "test": rows(heldout)},
        "chips": {split: rows([r for r in chips if role[_source_chip(r.id)] == split])
                  for split in ("train", "val", "test")},
    }


def _multi_hot(splits: dict[str, list[tuple[str, tuple[str, ...]]]]) -> tuple[list[str], dict[str, Any]]:
    """Labels with at least 2 positives in every split, and each split's multi-hot matrix."""
    import numpy as np

    counts = {split: {} for split in splits}
    for split, rows in splits.items():
        for _, labels in rows:
            for label in labels:
                counts[split][label] = counts[split].get(label, 0) + 1
    kept = sorted(label for label in counts["train"] if all(counts[s].get(label, 0) >= 2 for s in splits))
    index = {label: i for i, label in enumerate(kept)}
    truth = {}
    for split, rows in splits.items():
        matrix = np.zeros((len(rows), len(kept)), np.float32)
        for r, (_, labels) in enumerate(rows):
            for label in labels:
                if label in index:
                    matrix[r, index[label]] = 1
        truth[split] = matrix
    return kept, truth


def _stored_pixels(paths: Sequence[str], size: int) -> Any:
    """uint8 [N, size, size, 3]: the images as a dataset preprocessed at --image_size `size` stores
    them, decoded as training decodes them."""
    import numpy as np
    import tensorflow as tf

    from pipelines.images import ImageOptions, process

    options = ImageOptions(size=size)
    return np.stack([options.stored.decode(tf.constant(process(Path(p).read_bytes(), options))).numpy()
                     for p in paths])


def _extractor(name: str) -> Any:
    import tensorflow as tf

    from trainer import embedded_backbone

    loaded = tf.saved_model.load(embedded_backbone.build(name=name))
    return tf.function(lambda x: loaded(tf.image.convert_image_dtype(x, tf.float32), training=False))


def _features(extract: Any, pixels: Any) -> Any:
    import numpy as np

    return np.concatenate([extract(pixels[i:i + BATCH]).numpy() for i in range(0, len(pixels), BATCH)])


def _train_head(features: dict[str, Any], truth: dict[str, Any], seed: int) -> Any:
    """The trainer's default head on cached features; returns it (features [N, D] -> logits)."""
    import tf_keras

    from trainer.config import CACHED, DEFAULT_EPOCHS, DEFAULT_PATIENCE
    from trainer.model import build_head

    tf_keras.utils.set_random_seed(seed)
    head = build_head(features["train"].shape[1], truth["train"].shape[1], seed=seed)
    head.compile(tf_keras.optimizers.Adam(1e-3), tf_keras.losses.BinaryCrossentropy(from_logits=True))
    patience = DEFAULT_PATIENCE[CACHED]
    head.fit(features["train"], truth["train"], batch_size=256, epochs=DEFAULT_EPOCHS[CACHED], verbose=0,
             validation_data=(features["val"], truth["val"]), shuffle=True,
             callbacks=[tf_keras.callbacks.EarlyStopping(patience=patience, restore_best_weights=True),
                        tf_keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=max(1, patience // 2),
                                                             min_lr=1e-7)])
    return head


def _score(head: Any, features: dict[str, Any], truth: dict[str, Any], labels: list[str]) -> dict[str, float]:
    import tensorflow as tf

    from trainer.evaluation import evaluate
    from trainer.thresholds import tune_thresholds

    def probs(x: Any) -> Any:
        return tf.sigmoid(head.predict(x, batch_size=1024, verbose=0)).numpy()

    thresholds = tune_thresholds(truth["val"], probs(features["val"]), 1.0)
    metrics = evaluate(truth["test"], probs(features["test"]), labels, thresholds, 1.0)
    return {"macro_f1": metrics["at_tuned"]["macro_f1"], "map": metrics["macro_average_precision"]}


def _throughput(extractors: dict[str, Any], pixels: dict[int, Any], rounds: int) -> dict[str, float]:
    """Images/s of each configuration, timed round-robin on the same images; best round counts."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for key, extract in extractors.items():
            batch = pixels[int(key.rsplit("@", 1)[1])]
            extract(batch[:BATCH]).numpy()  # warm (traced for this shape)
            start = time.perf_counter()
            for i in range(0, len(batch), BATCH):
                extract(batch[i:i + BATCH]).numpy()
            best[key] = max(best.get(key, 0.0), len(batch) / (time.perf_counter() - start))
    return best


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    configs = [tuple(c) for c in spec["configs"]]
    seeds = range(spec["seeds"])
    sets: dict[str, Any] = {}
    for kind, splits in spec["splits"].items():
        labels, truth = _multi_hot(splits)
        sets[kind] = {"labels": labels, "truth": truth, "paths": {s: [p for p, _ in rows] for s, rows in splits.items()}}
    features: dict[str, dict[str, dict[str, Any]]] = {}  # key -> kind -> split (+ "val_flip", "test_flip")
    extraction: dict[str, dict[str, float]] = {}
    extractors = {}
    for name, size in configs:
        key = f"{name}@{size}"
        extract = extractors[key] = _extractor(name)
        images = seconds = 0.0
        features[key] = {}
        for kind, data in sets.items():
            features[key][kind] = {}
            for split, paths in data["paths"].items():
                pixels = _stored_pixels(paths, size)
                start = time.perf_counter()
                features[key][kind][split] = _features(extract, pixels)
                if split != "train":
                    features[key][kind][f"{split}_flip"] = _features(extract, pixels[:, :, ::-1])
                seconds += time.perf_counter() - start
                images += len(paths) * (1 if split == "train" else 2)
        extraction[key] = {"images": images, "seconds": seconds, "per_s": images / seconds}
        print(f"[backbones] {key}: {images:.0f} images in {seconds:.0f} s", flush=True)
    for first, second in spec["concatenations"]:
        features[f"{first}+{second}"] = {
            kind: {split: np.concatenate([features[first][kind][split], features[second][kind][split]], axis=1)
                   for split in features[first][kind]} for kind in sets}
    timing_pixels = {size: _stored_pixels(sets["posters"]["paths"]["test"][: spec["timing_images"]], size)
                     for size in sorted({size for _, size in configs})}
    speed = _throughput(extractors, timing_pixels, spec["timing_rounds"])
    scores: dict[str, Any] = {}
    for key, by_kind in features.items():
        scores[key] = {}
        for kind, split_features in by_kind.items():
            truth, labels = sets[kind]["truth"], sets[kind]["labels"]
            plain, flipped = [], []
            for seed in seeds:
                head = _train_head(split_features, truth, seed)
                plain.append(_score(head, split_features, truth, labels))
                tta = {"val": (split_features["val"] + split_features["val_flip"]) / 2,
                       "test": (split_features["test"] + split_features["test_flip"]) / 2}
                flipped.append(_score(head, tta, truth, labels))
            scores[key][kind] = {"plain": plain, "flip_tta": flipped}
        print(f"[backbones] {key}: heads trained", flush=True)
    return {"scores": scores, "extraction": extraction, "speed": speed,
            "labels": {kind: data["labels"] for kind, data in sets.items()},
            "split_sizes": {kind: {s: len(p) for s, p in data["paths"].items()} for kind, data in sets.items()}}


def _gmadds(key: str) -> float:
    total = 0.0
    for part in key.split("+"):
        name, size = part.rsplit("@", 1)
        gmadds, trained_at = GMADDS[name]
        total += gmadds * (int(size) / trained_at) ** 2
    return total


def _speed(measured: dict[str, Any], key: str) -> float:
    """Images/s of a configuration; of a concatenation, both passes one after the other."""
    return 1.0 / sum(1.0 / measured["speed"][part] for part in key.split("+"))


def _stats(runs: list[dict[str, float]], metric: str) -> tuple[float, float]:
    values = [r[metric] for r in runs]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(ctx: Context) -> dict[str, Any]:
    configs, concatenations = configurations(ctx)
    for name in sorted({name for name, _ in configs}):  # built before anything is timed
        run_child([PYTHON, "-m", "trainer.embedded_backbone", "build", "--backbone", name],
                  ctx.path("logs", f"embedded_backbone-{name}.log"))
    spec = {"configs": configs, "concatenations": concatenations, "splits": _splits(ctx),
            "seeds": ctx.sizes.backbone_seeds, "timing_images": 2 * BATCH, "timing_rounds": 1 if ctx.quick else 3}
    measured, process = ctx.child(NAME, spec, NAME)
    measured["process"] = process.as_dict()
    return report(ctx, measured)


def report(ctx: Context, measured: dict[str, Any]) -> dict[str, Any]:
    sizes = measured["split_sizes"]
    today = measured["speed"].get(TODAYS_DEFAULT)
    rows, summary = [], []
    for key, by_kind in measured["scores"].items():
        cells = []
        for kind in ("posters", "chips"):
            for variant in ("plain", "flip_tta"):
                for metric in ("macro_f1", "map"):
                    mean, spread = _stats(by_kind[kind][variant], metric)
                    cells.append(f"{mean:.3f}±{spread:.3f}")
        speed = _speed(measured, key)
        rows.append((key, f"{_gmadds(key):.2f}", f"{speed:.1f}", f"{today / speed:.2f}" if today else "-", *cells))
    headers = ("backbone@px", "GMAdds", "img/s", "cost vs today")
    for kind in ("posters", "chips"):
        headers += (f"{kind} F1", f"{kind} mAP", f"{kind} F1 flip", f"{kind} mAP flip")
    title = (f"Frozen features, trainer's default head, {ctx.sizes.backbone_seeds} seeds (mean±stdev); posters "
             f"{sizes['posters']} ({len(measured['labels']['posters'])} labels), chips {sizes['chips']} split by "
             f"source chip ({len(measured['labels']['chips'])} labels); 'flip': val/test features averaged with the "
             f"mirror image's; img/s: backbone alone, batch {BATCH}, side by side")
    table = format_table(headers, rows, title)
    if TODAYS_DEFAULT in measured["scores"]:
        base = measured["scores"][TODAYS_DEFAULT]
        for key, by_kind in measured["scores"].items():
            gain_f1 = _stats(by_kind["posters"]["plain"], "macro_f1")[0] - _stats(base["posters"]["plain"], "macro_f1")[0]
            gain_map = _stats(by_kind["posters"]["plain"], "map")[0] - _stats(base["posters"]["plain"], "map")[0]
            chips = _stats(by_kind["chips"]["plain"], "macro_f1")[0] - _stats(base["chips"]["plain"], "macro_f1")[0]
            cost = today / _speed(measured, key)
            met = gain_f1 >= TARGET_GAIN and gain_map >= TARGET_GAIN and cost <= 1.0 and chips >= 0
            summary.append(summary_row(f"backbone {key}: posters macro-F1 / mAP gain over {TODAYS_DEFAULT}",
                                       f"{gain_f1:+.3f} / {gain_map:+.3f}", f">= +{TARGET_GAIN} each, cost <= 1x, "
                                       "chips no worse", met, f"cost {cost:.2f}x, chips macro-F1 {chips:+.3f}"))
    return {"measured": measured, "summary": summary, "table": table}


def main(argv: Sequence[str] | None = None) -> int:
    return module_main(NAME, argv, child)


if __name__ == "__main__":
    sys.exit(main())
