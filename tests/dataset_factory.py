"""Writes small dataset directories that follow docs/dataset.md, for trainer tests.

Images are coloured shapes on noise; an image's labels are the shapes drawn on it. Each label
has its own shape and colour, so even a frozen random-filter backbone separates them and a
few epochs reach a clearly non-trivial F1.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

from tagbeam.dataset import to_example

from image_factory import encode

# (shape, RGB) per label index; labels beyond this list reuse shapes with other colours.
_STYLES = [
    ("ellipse", (230, 40, 40)),
    ("rectangle", (40, 200, 60)),
    ("triangle", (50, 80, 230)),
    ("cross", (240, 220, 40)),
    ("ellipse", (220, 60, 220)),
    ("rectangle", (40, 220, 220)),
]


def _draw(rng: np.random.Generator, size: int, present: np.ndarray) -> Image.Image:
    noise = rng.integers(60, 140, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    draw = ImageDraw.Draw(image)
    for index in np.flatnonzero(present):
        shape, colour = _STYLES[index % len(_STYLES)]
        extent = int(rng.integers(size // 4, size // 2))
        x0, y0 = (int(v) for v in rng.integers(0, size - extent, 2))
        box = (x0, y0, x0 + extent, y0 + extent)
        if shape == "ellipse":
            draw.ellipse(box, fill=colour)
        elif shape == "rectangle":
            draw.rectangle(box, fill=colour)
        elif shape == "triangle":
            draw.polygon([(x0, y0 + extent), (x0 + extent, y0 + extent), (x0 + extent // 2, y0)], fill=colour)
        else:
            third = extent // 3
            draw.rectangle((x0 + third, y0, x0 + 2 * third, y0 + extent), fill=colour)
            draw.rectangle((x0, y0 + third, x0 + extent, y0 + 2 * third), fill=colour)
    return image


def write_dataset(
    root: str,
    n_per_split: Mapping[str, int],
    image_size: int,
    labels: Sequence[str],
    seed: int,
    image_format: str = "jpeg",
    shards: int = 2,
) -> str:
    """Writes a dataset directory under `root` and returns its path.

    `n_per_split` maps split names to example counts (0 makes an empty split with no shards).
    Every example has at least one label (the pipeline's default `unlabeled_policy` rejects
    unlabeled rows). `dataset.json` is written last, as the pipeline does.
    """
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format must be jpeg or png, got {image_format!r}")
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    num_labels = len(labels)
    splits = {}
    for split, count in n_per_split.items():
        present = rng.random((count, num_labels)) < 0.4
        present[np.arange(count), rng.integers(0, num_labels, count)] |= ~present.any(axis=1)
        n_shards = min(shards, count)
        files = [f"{split}-{i:05d}-of-{n_shards:05d}.tfrecord.gz" for i in range(n_shards)]
        options = tf.io.TFRecordOptions(compression_type="GZIP")
        writers = [tf.io.TFRecordWriter(os.path.join(root, name), options) for name in files]
        for row in range(count):
            image = _draw(rng, image_size, present[row])
            encoded = encode(image, "JPEG", quality=95) if image_format == "jpeg" else encode(image, "PNG")
            writers[row % n_shards].write(to_example(f"{split}-{row}", encoded, np.flatnonzero(present[row]).tolist(),
                                                     num_labels))
        for writer in writers:
            writer.close()
        splits[split] = {
            "examples": count,
            "shards": n_shards,
            "files": files,
            "bytes": sum(os.path.getsize(os.path.join(root, name)) for name in files),
            "label_counts": {label: int(present[:, i].sum()) for i, label in enumerate(labels)},
        }
    with open(os.path.join(root, "labels.txt"), "w") as f:
        f.write("".join(f"{label}\n" for label in labels))
    total = sum(n_per_split.values())
    meta = {
        "format_version": 1,
        "labels": list(labels),
        "num_labels": num_labels,
        "image_size": image_size,
        "image_format": image_format,
        "jpeg_quality": 95,
        "jpeg_subsampling": "4:2:0",  # Pillow's default, what encode writes
        "shard_compression": "gzip",  # the pipeline's option; its default "none" is tested in test_preprocess
        "resize_policy": "squash",
        "splits": splits,
        "input_rows": total,
        "rejected": 0,
        "rejected_by_reason": {},
        "unlabeled_policy": "reject",
        "options": {"format": "synthetic", "seed": seed},
        "created": "2026-11-23T00:00:00Z",
    }
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return root


def read_examples(folder: str, info: dict) -> dict[str, dict]:
    """id -> split, labels, image, record size; asserts each id occurs once across all shards."""
    spec = {"id": tf.io.FixedLenFeature([], tf.string), "image": tf.io.FixedLenFeature([], tf.string),
            "labels": tf.io.FixedLenFeature([info["num_labels"]], tf.int64)}
    examples: dict[str, dict] = {}
    for split, summary in info["splits"].items():
        for name in summary["files"]:
            compression = {"none": "", "gzip": "GZIP"}[info["shard_compression"]]
            for record in tf.data.TFRecordDataset(os.path.join(folder, name), compression_type=compression):
                parsed = tf.io.parse_single_example(record, spec)
                id_ = parsed["id"].numpy().decode()
                assert id_ not in examples, f"{id_} written twice"
                examples[id_] = {"split": split, "labels": tuple(parsed["labels"].numpy().tolist()),
                                 "image": parsed["image"].numpy(), "bytes": len(record.numpy()), "file": name}
    return examples


def label_names(example: dict, info: dict) -> set[str]:
    return {label for label, bit in zip(info["labels"], example["labels"], strict=True) if bit}
