"""Size and build time of the model report (report.html) with synthetic scores: `python -m benchmarks.report_size`.

Two cases: the demo's size (10 labels) and a large one (1,000 labels x 20,000 test examples). Scores
are synthetic float32 (positives ~ Beta(5, 2), negatives ~ Beta(1, 20); about 3 labels per example),
thumbnails are synthetic 128 px JPEGs (smooth colour plus noise: harder to compress than posters).
The build is what `trainer.report.build` does after training: the page's evaluation section (sorting
every label's scores, the confusion counts, the gallery) and the HTML, without reading files. The
caps in trainer/report.py bound the page. With `--browser`, the page is also opened in headless
Chromium (tests/browser.py) and the time until it has rendered is printed.

The 10 % budget is against a lower bound of the training run's time: training predicts every test
image through the backbone, at the 28.4 images/s measured for the embedded MobileNetV2 at 384 px on
this machine kind (shared/notes/stack.md), so a run with N test examples takes at least N / 28.4 s.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

from tagbeam import pages
from trainer import report
from trainer.evaluation import evaluate
from trainer.thresholds import tune_thresholds

EXTRACTION_IMAGES_PER_S = 28.4
CASES = {"demo": (10, 1_000), "large": (1_000, 20_000)}


def synthetic(labels: int, examples: int, seed: int = 0) -> report.Scored:
    rng = np.random.default_rng(seed)
    truth = rng.random((examples, labels)) < min(0.3, 3.0 / labels)
    truth[np.arange(examples), rng.integers(0, labels, examples)] = True
    scores = np.where(truth, rng.beta(5, 2, truth.shape), rng.beta(1, 20, truth.shape)).astype(np.float32)
    return report.Scored(np.array([f"row-{i}" for i in range(examples)]), truth, scores)


def thumbnail(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, report.THUMBNAIL_PX)[None, :, None] * rng.random(3)
    image = np.clip(base + rng.normal(0, 25, (report.THUMBNAIL_PX, report.THUMBNAIL_PX, 3)), 0, 255).astype(np.uint8)
    return report.thumbnail_jpeg(image)


def measure(name: str, labels: int, examples: int) -> tuple[dict, str]:
    scored = synthetic(labels, examples)
    names = [f"label {k}" for k in range(labels)]
    thresholds = tune_thresholds(scored.truth, scored.scores)
    metrics = evaluate(scored.truth, scored.scores, names, thresholds, beta=1.0)
    rows = {r for groups in report.gallery_rows(scored, thresholds).values() for rs in groups.values() for r in rs}
    images = {r: thumbnail(r) for r in rows}
    cams = {(r, k): images[r] for k, groups in report.gallery_rows(scored, thresholds).items()
            for rs in groups.values() for r in rs}  # stand-ins of the same size class as the PNG overlays
    start = time.perf_counter()
    section = report.evaluation_section(scored, names, thresholds, metrics, images, cams, None)
    page = pages.render(pages.MODEL, name, {"summary": {"model_dir": name, "dataset": {"path": "-", "labels": names}},
                                            "history": {}, "evaluation": section})
    seconds = time.perf_counter() - start
    npz = len(scored.to_npz())
    budget = 0.1 * examples / EXTRACTION_IMAGES_PER_S
    return {"case": name, "labels": labels, "test_examples": examples, "gallery_images": len(images),
            "page_mb": len(page.encode()) / 1e6, "build_s": seconds, "scores_npz_mb": npz / 1e6,
            "budget_s": budget, "within_20_mb": len(page.encode()) < 20e6, "within_budget": seconds < budget}, page


def browser_seconds(page: str) -> float:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from browser import chromium, load

    with tempfile.TemporaryDirectory() as folder, chromium() as driver:
        path = os.path.join(folder, "report.html")
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
        start = time.perf_counter()
        problems, requests = load(driver, path)
        driver.find_element("id", "confusions")
        seconds = time.perf_counter() - start
        if problems or requests:
            raise RuntimeError(f"the page logged {problems} and requested {requests}")
        return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--browser", action="store_true", help="also time the page's load in headless Chromium")
    args = parser.parse_args(argv)
    results = []
    for name in args.cases.split(","):
        result, page = measure(name, *CASES[name])
        if args.browser:
            result["chromium_load_s"] = browser_seconds(page)
        results.append(result)
        print(json.dumps(result))
    out = io.StringIO()
    out.write("| case | labels x test examples | gallery images | page MB | build s | budget s (10 %) | scores npz MB |"
              + (" Chromium load s |" if args.browser else "") + "\n")
    for r in results:
        out.write(f"| {r['case']} | {r['labels']:,} x {r['test_examples']:,} | {r['gallery_images']} | {r['page_mb']:.2f} | "
                  f"{r['build_s']:.2f} | {r['budget_s']:.0f} | {r['scores_npz_mb']:.2f} |"
                  + (f" {r['chromium_load_s']:.2f} |" if args.browser else "") + "\n")
    print(out.getvalue())
    return 0 if all(r["within_20_mb"] and r["within_budget"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
