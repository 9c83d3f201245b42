"""Builds the project's embedded default datasets from real images that ship in packages.

No machine here can download the movie posters or the Planet chips, yet every pipeline, test and
demo needs data in exactly those formats. So real labelled images that come with packages are
dressed up as them (see ../shared/notes/offline-assets.md):

* ``posters/``: 2x2 mosaics of 1-4 Fashion-MNIST items, labelled with the set of tiled classes,
  with manifests in the Kaggle ``MovieGenre.csv`` format. The held-out manifest draws only from
  Fashion-MNIST's official test split, so no source item is shared with the train side.
* ``chips/``: real BigEarthNet Sentinel-2 patches as true-colour 256x256 JPEGs with a Planet
  ``train_v2.csv`` manifest.

The build is deterministic for a seed and idempotent: ``sample_data.json``, written last, records
the options, so a second run with the same options does nothing. A build goes to a hidden sibling
directory that is renamed into place only when complete.

    python -m sample_data --output DIR [--posters N] [--heldout_posters N]
        [--poster_size WxH] [--seed S] [--chips/--no_chips]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.manifests import MOVIE_GENRE_COLUMNS, PLANET_COLUMNS
from sample_data import sources as sample_sources

MARKER = "sample_data.json"
# Bump when the output changes for the same options, so that old builds are rebuilt.
FORMAT_VERSION = 1
FIRST_IMDB_ID = 1_000_001
JPEG_QUALITY = 90
CHIP_SIZE = 256
# Sentinel-2 L2A reflectance x 10000 sits mostly below 3000 over land; a fixed scale (not a
# per-image stretch) keeps chips comparable, and a display gamma lifts the dark vegetation.
REFLECTANCE_WHITE = 3000.0
CHIP_GAMMA = 2.2


@dataclass(frozen=True)
class PosterPlan:
    """Everything random about one poster, drawn up front so rendering is a pure function."""

    imdb_id: int
    score: float
    cells: tuple[int, ...]  # grid cell (0..3, row-major) of each item
    items: tuple[int, ...]  # index into the Fashion-MNIST split of each item
    classes: tuple[int, ...]  # class id of each item
    jitter: tuple[tuple[int, int], ...]  # (dx, dy) of each item inside its cell
    background: tuple[int, int, int]
    tint: tuple[int, int, int]


def plan_posters(labels: np.ndarray, count: int, first_id: int, size: tuple[int, int],
                 rng: np.random.Generator) -> list[PosterPlan]:
    """Draws ``count`` poster layouts over one Fashion-MNIST split.

    Each poster tiles k ~ U{1..4} items of k distinct classes, so its label set has k genres
    and every class appears on about a quarter of the posters. Items are used without
    replacement within a split (cycling only if a class runs out), so posters rarely repeat.
    """
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(sample_sources.FASHION_MNIST_CLASSES))]
    used = [0] * len(pools)
    cell_w, cell_h = _cell_size(size)
    slack_x, slack_y = cell_w - _item_side(size), cell_h - _item_side(size)
    plans = []
    for i in range(count):
        k = int(rng.integers(1, 5))
        classes = tuple(int(c) for c in rng.choice(len(pools), size=k, replace=False))
        cells = tuple(int(c) for c in rng.choice(4, size=k, replace=False))
        items = []
        for c in classes:
            items.append(int(pools[c][used[c] % len(pools[c])]))
            used[c] += 1
        jitter = tuple((int(rng.integers(0, slack_x + 1)), int(rng.integers(0, slack_y + 1))) for _ in range(k))
        # Real IMDb scores centre on about 6.4 with a spread of about one point.
        score = round(float(np.clip(rng.normal(6.4, 1.0), 1.0, 9.6)), 1)
        # Dark backgrounds and light tints keep every channel at least 100 levels apart.
        background = tuple(int(v) for v in rng.integers(10, 80, size=3))
        tint = tuple(int(v) for v in rng.integers(180, 256, size=3))
        plans.append(PosterPlan(first_id + i, score, cells, tuple(items), classes, jitter, background, tint))
    return plans


def _band(size: tuple[int, int]) -> int:
    # Title and credits strips, top and bottom, as on a movie poster.
    return size[1] // 10


def _cell_size(size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    return width // 2, (height - 2 * _band(size)) // 2


def _item_side(size: tuple[int, int]) -> int:
    return max(1, int(min(_cell_size(size)) * 0.92))


def render_poster(plan: PosterPlan, images: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Draws one poster: items tinted over a coloured background between two title strips.

    Fashion-MNIST items are bright on black, so their intensity serves as the alpha of the tint:
    the item stays exactly as recognisable as the source while the poster gets colour.
    """
    width, height = size
    background = np.array(plan.background, np.float32)
    tint = np.array(plan.tint, np.float32)
    canvas = np.empty((height, width, 3), np.float32)
    canvas[:] = background
    band = _band(size)
    canvas[:band] = background * 0.5 + tint * 0.25
    canvas[height - band // 2:] = background * 0.5
    cell_w, cell_h = _cell_size(size)
    side = _item_side(size)
    for cell, item, (dx, dy) in zip(plan.cells, plan.items, plan.jitter, strict=True):
        x = (cell % 2) * cell_w + dx
        y = band + (cell // 2) * cell_h + dy
        item_image = Image.fromarray(images[item]).resize((side, side), Image.Resampling.BILINEAR)
        alpha = np.asarray(item_image, np.float32)[..., None] / 255.0
        region = canvas[y:y + side, x:x + side]
        region += (tint - region) * alpha
    return Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")


def build_posters(out_dir: Path, train_count: int, heldout_count: int, size: tuple[int, int],
                  seed: int) -> dict[str, Counter]:
    """Writes poster JPEGs and the two MovieGenre-format manifests; returns genre counts.

    The train side draws from Fashion-MNIST's train split and the held-out side from its test
    split, so evaluation on the held-out manifest never sees a training item. ``sources.csv``
    records each poster's source split and indices so that this stays checkable.
    """
    rng = np.random.default_rng([seed, 0])
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True)
    counts: dict[str, Counter] = {}
    sides = (("train", "train", "MovieGenre.csv", train_count, FIRST_IMDB_ID),
             ("heldout", "t10k", "MovieGenre-heldout.csv", heldout_count, FIRST_IMDB_ID + train_count))
    with open(out_dir / "sources.csv", "w", newline="") as sources_file:
        sources = csv.writer(sources_file, lineterminator="\n")
        sources.writerow(("imdbId", "split", "source_indices"))
        for side, split, manifest, count, first_id in sides:
            images, labels = sample_sources.fashion_mnist(split)
            counts[side] = Counter()
            with open(out_dir / manifest, "w", newline="") as manifest_file:
                writer = csv.writer(manifest_file, lineterminator="\n")
                writer.writerow(MOVIE_GENRE_COLUMNS)
                for plan in plan_posters(labels, count, first_id, size, rng):
                    relative = f"images/tt{plan.imdb_id}.jpg"
                    render_poster(plan, images, size).save(out_dir / relative, quality=JPEG_QUALITY)
                    genres = [sample_sources.FASHION_MNIST_CLASSES[c] for c in sorted(plan.classes)]
                    counts[side].update(genres)
                    writer.writerow((plan.imdb_id, f"http://www.imdb.com/title/tt{plan.imdb_id}",
                                     f"Sample Poster {plan.imdb_id} (2026)", f"{plan.score:.1f}",
                                     "|".join(genres), relative))
                    sources.writerow((plan.imdb_id, split, " ".join(map(str, plan.items))))
    return counts


def render_chip(rgb: np.ndarray) -> Image.Image:
    """True-colour chip of a Sentinel-2 patch at Planet's 256x256."""
    scaled = np.clip(rgb.astype(np.float32) / REFLECTANCE_WHITE, 0.0, 1.0) ** (1.0 / CHIP_GAMMA)
    image = Image.fromarray(np.rint(scaled * 255.0).astype(np.uint8), "RGB")
    return image.resize((CHIP_SIZE, CHIP_SIZE), Image.Resampling.BICUBIC)


def build_chips(out_dir: Path) -> tuple[Counter, Counter]:
    """Writes the real BigEarthNet patches as Planet-format chips; returns tag and source counts.

    Tags are the BigEarthNet 19-class names as Planet-style tokens, since Planet's manifest
    separates tags with spaces.
    """
    image_dir = out_dir / "train-jpg"
    image_dir.mkdir(parents=True)
    tags_count: Counter = Counter()
    sources_count: Counter = Counter()
    with open(out_dir / "train_v2.csv", "w", newline="") as manifest_file:
        writer = csv.writer(manifest_file, lineterminator="\n")
        writer.writerow(PLANET_COLUMNS)
        for patch in sample_sources.bigearthnet_patches():
            name = f"ben_{patch.name}"
            render_chip(patch.rgb).save(image_dir / f"{name}.jpg", quality=JPEG_QUALITY)
            tags = [sample_sources.planet_tag(label) for label in patch.labels]
            writer.writerow((name, " ".join(tags)))
            tags_count.update(tags)
            sources_count[patch.source] += 1
    return tags_count, sources_count


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(output_dir: Path) -> None:
    # Leftovers of killed builds: hidden siblings named after a process that no longer runs.
    for path in output_dir.parent.glob(f".{output_dir.name}.*-*"):
        pid = path.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _publish(staging: Path, output_dir: Path) -> None:
    # Swap by renames so that DIR is always either the old complete build or the new one.
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(old)
        staging.rename(output_dir)
        shutil.rmtree(old)
    else:
        staging.rename(output_dir)


def _table(columns: dict[str, Counter], label_title: str) -> str:
    labels = sorted(set().union(*columns.values()))
    width = max([len(label_title), *map(len, labels)])
    lines = [f"{label_title:<{width}}  " + "  ".join(f"{c:>8}" for c in columns)]
    for label in labels:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{columns[c][label]:>8}" for c in columns))
    return "\n".join(lines)


def build(output_dir: Path | str, posters: int = 5000, heldout_posters: int = 1000,
          poster_size: tuple[int, int] = (182, 268), seed: int = 0, chips: bool = True) -> dict:
    """Builds all sample datasets into ``output_dir`` unless an identical build is already there.

    Returns the build record (the content of ``sample_data.json``). The options decide whether
    a build can be reused, so a different seed or size rebuilds, and an interrupted build is
    never mistaken for a finished one.
    """
    output_dir = Path(output_dir).resolve()
    if posters < 0 or heldout_posters < 0:
        raise ValueError("poster counts must not be negative")
    if min(poster_size) < 16:
        raise ValueError(f"poster size {poster_size} is too small for a 2x2 mosaic")
    options = {"version": FORMAT_VERSION, "posters": posters, "heldout_posters": heldout_posters,
               "poster_size": list(poster_size), "seed": seed, "chips": chips}
    marker = output_dir / MARKER
    if marker.exists():
        record = json.loads(marker.read_text())
        if record.get("options") == options:
            print(f"[sample_data] {output_dir} already holds this build; nothing to do")
            return record
    # Only an empty directory or an earlier build may be replaced: never a user's own folder.
    if output_dir.is_dir() and any(output_dir.iterdir()) and not marker.exists():
        raise FileExistsError(f"{output_dir} is not empty and holds no sample data build; not replacing it")

    start = time.monotonic()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(output_dir)
    staging = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        poster_counts = build_posters(staging / "posters", posters, heldout_posters, poster_size, seed)
        record: dict = {
            "options": options,
            "manifests": {"posters_train": "posters/MovieGenre.csv",
                          "posters_heldout": "posters/MovieGenre-heldout.csv"},
            "counts": {"posters_train": posters, "posters_heldout": heldout_posters},
            "label_counts": {"posters_train": dict(sorted(poster_counts["train"].items())),
                             "posters_heldout": dict(sorted(poster_counts["heldout"].items()))},
        }
        tables = [_table({"train": poster_counts["train"], "heldout": poster_counts["heldout"]}, "poster genre")]
        if chips:
            tag_counts, source_counts = build_chips(staging / "chips")
            record["manifests"]["chips"] = "chips/train_v2.csv"
            record["counts"]["chips"] = sum(source_counts.values())
            record["label_counts"]["chips"] = dict(sorted(tag_counts.items()))
            record["chip_sources"] = dict(sorted(source_counts.items()))
            tables.append(_table({"chips": tag_counts}, "chip tag"))
        # Written last: its presence is what marks the build complete.
        (staging / MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        _publish(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print("\n\n".join(tables))
    print(f"[sample_data] built {output_dir} in {time.monotonic() - start:.1f} s: "
          + ", ".join(f"{k}={v}" for k, v in record["counts"].items()))
    return record


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 182x268, got {text!r}") from None
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sample_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="directory to build into")
    parser.add_argument("--posters", type=int, default=5000, help="train-side posters (Fashion-MNIST train)")
    parser.add_argument("--heldout_posters", type=int, default=1000, help="held-out posters (Fashion-MNIST t10k)")
    parser.add_argument("--poster_size", type=_size, default=(182, 268), help="poster WIDTHxHEIGHT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chips", dest="chips", action="store_true", default=True,
                        help="build the BigEarthNet chips (default)")
    parser.add_argument("--no_chips", dest="chips", action="store_false", help="skip the chips")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; the defaults are the datasets the project embeds."""
    args = build_parser().parse_args(argv)
    build(args.output, args.posters, args.heldout_posters, args.poster_size, args.seed, args.chips)
    return 0

