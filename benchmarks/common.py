"""What every benchmark shares: sizes, the work folder and its cached inputs, child processes
measured with wait4 (wall, CPU, peak RSS), the machine's description and load, tables and JSON.

The parent (`run_all` or one module's `main`) never imports TensorFlow or Beam: heavy work runs in
child processes, so each child's CPU time and peak RSS are its own and the parent stays small.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pipelines.images import ImageOptions

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
IMAGE_SIZE = ImageOptions().size  # the pipeline's default, which every benchmark dataset uses
FLOAT32_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3 * 4  # one example as the Google book's pipeline stores it
UINT8_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3
CHIP_SIDE = 256
CHIP_JPEG_QUALITY = 90  # like the sample chips and the peers' throughput references
PHOTO_SIZE = (500, 375)  # a typical VOC2012 photo


@dataclasses.dataclass(frozen=True)
class Sizes:
    sample_posters: int  # train-side posters built by `python -m sample_data`
    sample_heldout: int  # held-out posters (Fashion-MNIST test split)
    throughput_images: int  # posters and chips timed in the throughput benchmark
    throughput_small: int  # the small run that measures a pipeline run's fixed cost
    memory_n: int  # peak RSS at N and 10N posters
    train_posters: int  # dataset of the time-to-train comparison
    train_epochs: int
    quality_posters: int  # train-side posters of the quality table (val/test fractions 0.1 each)
    tutorial_epochs: int
    fine_tune_layers: int  # 0 = no fine-tuning run
    fine_tune_epochs: int
    fine_tune_batch_size: int  # smaller than the default's 256: more steps for the same images
    serving_single_calls: int
    serving_batch_calls: int
    input_passes: int  # passes per input pipeline (the best one counts)
    input_epochs: int  # epochs over the split per pass, each with a fresh iterator as in training
    input_sets: tuple[str, ...]  # image kinds of the input-pipeline benchmark
    batch_size: int  # trainer runs (256 = the trainer's default and the tutorial's)
    default_epochs: int | None  # --epochs of the default recipe; None = the trainer's default
    nights_posters: int  # night 1 of the retraining benchmark (night 2 adds 10 %)
    overhead_posters: int  # dataset of the trainer-overhead comparison (trainer vs bare backbone pass)
    gpu_images: int  # images per contender in the GPU benchmark
    gpu_fine_tune_steps: int  # timed fine-tuning steps per contender in the GPU benchmark
    backbone_posters: int  # train posters of the backbone comparison (then backbone_val for val)
    backbone_val: int
    backbone_heldout: int  # held-out posters it scores
    backbone_chips: int  # chips (make_chips), split 60/20/20 by source chip
    backbone_seeds: int  # heads trained per backbone configuration


FULL = Sizes(sample_posters=10_000, sample_heldout=2_000,
             throughput_images=3_000, throughput_small=300, memory_n=1_000, input_passes=3, input_epochs=5,
             input_sets=("posters", "chips", "photos"),
             train_posters=500, train_epochs=30, batch_size=256,
             quality_posters=5_000, default_epochs=None, tutorial_epochs=30,
             fine_tune_layers=30, fine_tune_epochs=8, fine_tune_batch_size=64,
             serving_single_calls=200, serving_batch_calls=20, nights_posters=2_000,
             overhead_posters=5_000, gpu_images=256, gpu_fine_tune_steps=3,
             backbone_posters=600, backbone_val=250, backbone_heldout=500, backbone_chips=360, backbone_seeds=3)
QUICK = Sizes(sample_posters=300, sample_heldout=64,
              throughput_images=200, throughput_small=40, memory_n=20, input_passes=1, input_epochs=1,
              input_sets=("posters", "chips"),
              train_posters=200, train_epochs=1, batch_size=32,
              quality_posters=200, default_epochs=2, tutorial_epochs=2,
              fine_tune_layers=0, fine_tune_epochs=0, fine_tune_batch_size=0,
              serving_single_calls=10, serving_batch_calls=2, nights_posters=200,
              overhead_posters=200, gpu_images=64, gpu_fine_tune_steps=2,
              backbone_posters=60, backbone_val=30, backbone_heldout=30, backbone_chips=64, backbone_seeds=2)


class BenchmarkError(RuntimeError):
    """A step of a benchmark failed; the message says which command and where its log is."""


# ---------------------------------------------------------------- measurement

def cpu_seconds() -> float:
    """User + system CPU of this process (all threads) and of its waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Stopwatch:
    """Wall and CPU seconds of a `with` block (CPU of this process and its waited-for children)."""

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = cpu_seconds() - self._cpu

    def rates(self, items: int) -> dict[str, float]:
        """items/s of wall time, cores used, and items per CPU-second (= items/s per fully used core)."""
        return {"items": items, "wall_s": self.wall_s, "cpu_s": self.cpu_s,
                "per_s": items / self.wall_s, "cores_used": self.cpu_s / self.wall_s,
                "per_core_s": items / self.cpu_s}


@dataclasses.dataclass(frozen=True)
class ChildRun:
    command: list[str]
    wall_s: float
    cpu_s: float  # user + sys of the child and its own waited-for children
    peak_rss_mb: float  # ru_maxrss of the child (the largest of it and its descendants)
    log: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_child(command: Sequence[str], log: Path, env: dict[str, str] | None = None) -> ChildRun:
    """Runs `command` from the repo root, output to `log`; measures it with wait4 (its own rusage)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                 "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    with open(log, "w") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(list(command), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=child_env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise BenchmarkError(f"`{shlex.join(command)}` exited with {proc.returncode}; log {log}, last lines:\n{tail}")
    return ChildRun(list(command), wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, str(log))


# ---------------------------------------------------------------- machine and load

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def machine_info() -> dict[str, Any]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "ram_gb": round(_mem_total_gb(), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in ("tensorflow", "apache-beam", "tensorflow-transform", "pillow",
                                              "numpy", "scikit-learn")},
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all processes), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """How busy the machine was during a `with` block, and how much of that was someone else.

    `others_cores` = machine busy CPU-seconds minus ours, per wall second: the competing load that
    makes wall-clock figures noisy (CPU-time figures are much less affected).
    """

    def __init__(self, every_s: float = 2.0) -> None:
        self._every_s = every_s
        self._samples: list[float] = []
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self._every_s):
            self._samples.append(float(Path("/proc/loadavg").read_text().split()[0]))

    def __enter__(self) -> LoadMeter:
        self._start = (time.perf_counter(), _busy_seconds(), cpu_seconds())
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.perf_counter() - self._start[0]
        busy = _busy_seconds() - self._start[1]
        ours = cpu_seconds() - self._start[2]
        samples = self._samples or [float(Path("/proc/loadavg").read_text().split()[0])]
        self.summary = {
            "wall_s": round(wall, 1),
            "machine_busy_cores": round(busy / wall, 2),
            "our_cores": round(ours / wall, 2),
            "others_cores": round(max(0.0, busy - ours) / wall, 2),
            "loadavg1_mean": round(sum(samples) / len(samples), 2),
            "loadavg1_max": round(max(samples), 2),
        }


# ---------------------------------------------------------------- tables and JSON

def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str = "") -> str:
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [title] if title else []
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(lines)


def summary_row(metric: str, value: Any, target: str = "", met: bool | None = None, note: str = "") -> dict[str, Any]:
    """One line of the headline table: `met` is None where the issue sets no target."""
    return {"metric": metric, "value": value, "target": target, "met": met, "note": note}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------- inputs and cached artefacts

@dataclasses.dataclass(frozen=True)
class ManifestRow:
    id: str
    path: Path  # the image file
    labels: tuple[str, ...]


def read_manifest(manifest: Path) -> list[ManifestRow]:
    """Rows of a MovieGenre.csv (local Poster paths) or Planet train_v2.csv (train-jpg/ beside it)."""
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        if "Poster" in (reader.fieldnames or []):
            return [ManifestRow(r["imdbId"], manifest.parent / r["Poster"], tuple(r["Genre"].split("|")))
                    for r in reader]
        return [ManifestRow(r["image_name"], manifest.parent / "train-jpg" / f"{r['image_name']}.jpg",
                            tuple(r["tags"].split())) for r in reader]


def make_chips(source: Path, out: Path, count: int) -> Path:
    """`count` chip-like 256x256 JPEGs from the real chips in `source` (a Planet folder), as a
    Planet folder `out`; returns its manifest. Deterministic: chip c, offset (dx, dy) on a 3x3 grid
    of a mirror-extended copy (symmetric padding, so no seams), then one of the 8 dihedral
    symmetries; 60 chips give up to 4,320 distinct images."""
    import numpy as np
    from PIL import Image

    manifest = out / "train_v2.csv"
    if manifest.exists() and len(read_manifest(manifest)) == count:
        return manifest
    chips = read_manifest(source / "train_v2.csv")
    offsets = [(dx, dy) for dy in (0, 85, 170) for dx in (0, 85, 170)]
    variants = [(c, o, d) for o in offsets for d in range(8) for c in range(len(chips))]
    if count > len(variants):
        raise BenchmarkError(f"make_chips: {count} chips requested, at most {len(variants)} can be derived")
    (out / "train-jpg").mkdir(parents=True, exist_ok=True)
    extended = {}
    rows = []
    for c, (dx, dy), d in variants[:count]:
        if c not in extended:
            pixels = np.asarray(Image.open(chips[c].path).convert("RGB"))
            extended[c] = np.pad(pixels, ((0, CHIP_SIDE), (0, CHIP_SIDE), (0, 0)), mode="symmetric")
        crop = extended[c][dy:dy + CHIP_SIDE, dx:dx + CHIP_SIDE]
        crop = np.rot90(crop[:, ::-1] if d >= 4 else crop, d % 4)
        name = f"{chips[c].id}_x{dx}_y{dy}_d{d}"
        Image.fromarray(np.ascontiguousarray(crop)).save(out / "train-jpg" / f"{name}.jpg", quality=CHIP_JPEG_QUALITY)
        rows.append((name, " ".join(chips[c].labels)))
    tmp = manifest.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("image_name", "tags"))
        writer.writerows(rows)
    tmp.replace(manifest)
    return manifest


def make_photos(posters: Path, out: Path, count: int) -> Path:
    """`count` photo-size (500x375) JPEGs as a MovieGenre.csv folder `out`; returns its manifest.
    Photo i is posters 2i and 2i+1 of the `posters` manifest side by side (364x268), upscaled
    (bicubic) to 500x375, labelled with both posters' labels. A stand-in for VOC-size photos: the
    pixel count is a photo's, though upscaled content is smoother (so cheaper to decode) than a
    real photo's."""
    from PIL import Image

    manifest = out / "MovieGenre.csv"
    if manifest.exists() and len(read_manifest(manifest)) == count:
        return manifest
    rows = read_manifest(posters)
    if 2 * count > len(rows):
        raise BenchmarkError(f"make_photos: {count} photos need {2 * count} posters, {posters} has {len(rows)}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        left, right = Image.open(rows[2 * i].path).convert("RGB"), Image.open(rows[2 * i + 1].path).convert("RGB")
        pair = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
        pair.paste(left, (0, 0))
        pair.paste(right, (left.width, 0))
        photo_id = str(9_000_001 + i)
        pair.resize(PHOTO_SIZE, Image.Resampling.BICUBIC).save(out / "images" / f"p{photo_id}.jpg",
                                                               quality=CHIP_JPEG_QUALITY)
        labels = "|".join(sorted(set(rows[2 * i].labels) | set(rows[2 * i + 1].labels)))
        lines.append((photo_id, "", f"Photo {photo_id}", "5.0", labels, f"images/p{photo_id}.jpg"))
    tmp = manifest.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("imdbId", "Imdb Link", "Title", "IMDB Score", "Genre", "Poster"))
        writer.writerows(lines)
    tmp.replace(manifest)
    return manifest


@dataclasses.dataclass
class Context:
    """The work folder (large outputs; never in the repo) and the inputs built in it on demand."""

    work: Path
    quick: bool
    sizes: Sizes
    preprocess_runs: dict[str, dict] = dataclasses.field(default_factory=dict)
    backbone_built: bool = False

    @classmethod
    def create(cls, work: str | None, quick: bool) -> Context:
        default = REPO / "work" / ("bench-quick" if quick else "bench")
        path = Path(work).resolve() if work else default
        path.mkdir(parents=True, exist_ok=True)
        return cls(path, quick, QUICK if quick else FULL)

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    def sample(self) -> Path:
        """The sample data (posters, held-out posters, real chips); a no-op when already built."""
        out = self.path("sample")
        marker = out / "sample_data.json"
        if not marker.exists() or read_json(marker).get("options", {}).get("posters") != self.sizes.sample_posters:
            # Posters and chips derived from an older build are stale.
            for stale in (self.path("datasets"), self.path("chips"), self.path("photos"), self.path("models"),
                          self.path("feature_cache")):
                shutil.rmtree(stale, ignore_errors=True)
            run_child([PYTHON, "-m", "sample_data", "--output", str(out), "--posters",
                       str(self.sizes.sample_posters), "--heldout_posters", str(self.sizes.sample_heldout)],
                      self.path("logs", "sample_data.log"))
        return out

    def poster_manifest(self, count: int) -> Path:
        """The first `count` rows of the sample's MovieGenre.csv, beside it (image paths are relative)."""
        source = self.sample() / "posters" / "MovieGenre.csv"
        target = source.with_name(f"bench-{count}.csv")
        if not target.exists():
            lines = source.read_text().splitlines(keepends=True)
            if count > len(lines) - 1:
                raise BenchmarkError(f"{count} posters requested, the sample has {len(lines) - 1}; "
                                     "raise Sizes.sample_posters")
            target.write_text("".join(lines[:count + 1]))
        return target

    def heldout_manifest(self) -> Path:
        return self.sample() / "posters" / "MovieGenre-heldout.csv"

    def chip_manifest(self, count: int) -> Path:
        return make_chips(self.sample() / "chips", self.path("chips", f"chips-{count}"), count)

    def photo_manifest(self, count: int) -> Path:
        return make_photos(self.sample() / "posters" / "MovieGenre.csv", self.path("photos", f"photos-{count}"), count)

    def manifest(self, kind: str, count: int) -> Path:
        """The manifest of `count` images of `kind`: posters, chips or photos."""
        makers = {"posters": self.poster_manifest, "chips": self.chip_manifest, "photos": self.photo_manifest}
        if kind not in makers:
            raise BenchmarkError(f"unknown image kind {kind!r}; expected one of {', '.join(makers)}")
        return makers[kind](count)

    def preprocess(self, manifest: Path, name: str, extra: Sequence[str] = ()) -> ChildRun:
        """`python -m pipelines.preprocess` in a fresh process into datasets/<name> (replaced)."""
        out = self.path("datasets", name)
        run = run_child([PYTHON, "-m", "pipelines.preprocess", "--input", str(manifest), "--output", str(out),
                         "--overwrite", *extra], self.path("logs", f"preprocess-{name}.log"))
        self.preprocess_runs[name] = run.as_dict()
        return run

    def dataset(self, kind: str, count: int) -> Path:
        """datasets/<kind>-<count> (see `manifest`), preprocessed with defaults if absent."""
        name = f"{kind}-{count}"
        out = self.path("datasets", name)
        if not (out / "dataset.json").exists():
            self.preprocess(self.manifest(kind, count), name)
        return out

    def train(self, name: str, data_dir: Path, flags: Sequence[str] = (), share_features: bool = False
              ) -> tuple[Path, ChildRun]:
        """`python -m trainer.task` (seed 0) in a fresh process into models/<name> (replaced).

        share_features: the model folder's feature_cache/ links to one cache per dataset, so runs
        on the same data extract the backbone features once (the trainer keys its cache by data,
        backbone and image size, so sharing cannot mix up features)."""
        # The embedded backbone is built once per machine (~6 s); that install step must not land
        # in whichever measured run happens to come first.
        if not self.backbone_built:
            run_child([PYTHON, "-m", "trainer.embedded_backbone", "build"], self.path("logs", "embedded_backbone.log"))
            self.backbone_built = True
        model_dir = self.path("models", name)
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        if share_features:
            shared = self.path("feature_cache", data_dir.name)
            shared.mkdir(parents=True, exist_ok=True)
            (model_dir / "feature_cache").symlink_to(shared, target_is_directory=True)
        run = run_child([PYTHON, "-m", "trainer.task", "--data_dir", str(data_dir), "--model_dir", str(model_dir),
                         "--seed", "0", *flags], self.path("logs", f"train-{name}.log"))
        return model_dir, run

    def child(self, module: str, spec: dict[str, Any], name: str) -> tuple[dict[str, Any], ChildRun]:
        """Runs `python -m benchmarks.<module> --child SPEC OUT`; returns (its JSON result, its measurement)."""
        spec_path, out_path = self.path("tmp", f"{name}.spec.json"), self.path("tmp", f"{name}.out.json")
        write_json(spec_path, spec)
        out_path.unlink(missing_ok=True)
        run = run_child([PYTHON, "-m", f"benchmarks.{module}", "--child", str(spec_path), str(out_path)],
                        self.path("logs", f"{name}.log"))
        return read_json(out_path), run


# ---------------------------------------------------------------- command lines

def child_main(argv: Sequence[str], work: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """`--child SPEC OUT`: runs `work(spec)` in this process and writes its result to OUT."""
    spec_path, out_path = argv[1], argv[2]
    write_json(Path(out_path), work(read_json(spec_path)))


def run_benchmark(module_name: str, ctx: Context) -> dict[str, Any]:
    """Runs one benchmark module's `run(ctx)` under a LoadMeter; adds the load and the timing."""
    module = importlib.import_module(f"benchmarks.{module_name}")
    print(f"\n=== {module_name}: {module.__doc__.strip().splitlines()[0]}", flush=True)
    with LoadMeter() as load:
        result = module.run(ctx)
    result["load"] = load.summary
    print(result["table"])
    print(f"[{module_name}] {load.summary['wall_s']} s; machine busy {load.summary['machine_busy_cores']} cores, "
          f"of which others {load.summary['others_cores']}; load average {load.summary['loadavg1_mean']} "
          f"(max {load.summary['loadavg1_max']})", flush=True)
    return result


def module_main(module_name: str, argv: Sequence[str] | None, child: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> int:
    """The command line of one benchmark module: `python -m benchmarks.<name> [--quick] [--work D] [--out F]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"] and child is not None:
        child_main(argv, child)
        return 0
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{module_name}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--work", default=None, help="work folder (default work/bench or work/bench-quick)")
    parser.add_argument("--out", default=None, help="JSON result file (default <work>/<name>.json)")
    args = parser.parse_args(argv)
    ctx = Context.create(args.work, args.quick)
    result = run_benchmark(module_name, ctx)
    out = Path(args.out) if args.out else ctx.path(f"{module_name}.json")
    write_json(out, {"machine": machine_info(), "quick": ctx.quick, "sizes": dataclasses.asdict(ctx.sizes),
                     module_name: result})
    print(f"wrote {out}")
    return 0
