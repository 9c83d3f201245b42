"""Two nights of scheduled retraining over HTTP: what the second night costs with reuse vs without.

The sample posters are served by a local HTTP server (Python's static file server: Last-Modified,
and 304 for a matching If-Modified-Since) that counts its answers. Night 1 runs
`python -m pipelines.retrain` on N posters. Night 2 adds 10 % new rows and relabels 1 % of the old
ones, and runs twice from copies of the same workspace: as scheduled (the default: stored images of
unchanged sources reused, backbone features taken from the workspace's store) and as a full rebuild
(`--full_rebuild` and an empty feature store: what every night cost before). Each run is a fresh
process measured with wait4; the step times come from retrain's own log lines.
"""
from __future__ import annotations

import csv
import functools
import http.server
import json
import re
import shutil
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import PYTHON, Context, format_table, module_main, run_child, summary_row

NAME = "retrain_nights"
TARGET_RATIO = 0.5  # the scheduled night 2 at most half the full rebuild's wall time


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    statuses: Counter  # set per server

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        self.statuses[int(code)] += 1

    def log_message(self, *args: object) -> None:
        pass


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, Counter]:
    statuses: Counter = Counter()
    handler = type("Handler", (_CountingHandler,), {"statuses": statuses})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, statuses


RELABEL_EVERY = 100  # night 2 relabels every 100th row


def _manifest(source: Path, out: Path, base_url: str, rows: int, relabel_every: int | None) -> Path:
    with open(source, newline="") as f:
        header, *body = list(csv.reader(f))
    poster, genre = header.index("Poster"), header.index("Genre")
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, row in enumerate(body[:rows]):
            row = list(row)
            row[poster] = f"{base_url}/{row[poster]}"
            if relabel_every and i % relabel_every == 0:
                row[genre] = "Bag" if "Bag" not in row[genre] else "Sneaker"
            writer.writerow(row)
    return out


def _step_seconds(log: str) -> dict[str, float]:
    text = Path(log).read_text(errors="replace")
    return {step: float(s) for step, s in re.findall(r"\[(preprocess|train)\] done in ([0-9.]+) s", text)}


def _night(ctx: Context, workspace: Path, manifest: Path, name: str, statuses: Counter, extra: Sequence[str] = ()
           ) -> dict[str, Any]:
    before = Counter(statuses)
    run = run_child([PYTHON, "-m", "pipelines.retrain", "--workspace", str(workspace), "--input", str(manifest),
                     "--allow_loopback", "--seed", "0", *extra], ctx.path("logs", f"{NAME}-{name}.log"))
    history = [json.loads(line) for line in (workspace / "history.jsonl").read_text().splitlines()]
    record = history[-1]
    run_dir = workspace / "runs" / record["run_id"]
    train_run = json.loads((run_dir / "model" / "run.json").read_text())
    answers = {str(code): n - before.get(code, 0) for code, n in statuses.items() if n - before.get(code, 0)}
    return {**run.as_dict(), "steps_s": _step_seconds(run.log), "http_answers": answers, "outcome": record["outcome"],
            "data": record["data"], "features_extracted": train_run["timings"].get("feature_extraction_images"),
            "macro_f1": record["decision"]["challenger"]["macro_f1"]}


def run(ctx: Context) -> dict[str, Any]:
    count = ctx.sizes.nights_posters
    posters = ctx.sample() / "posters"
    work = ctx.path("nights")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    server, statuses = _serve(posters)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        night1 = _manifest(posters / "MovieGenre.csv", work / "night1.csv", url, count, None)
        night2 = _manifest(posters / "MovieGenre.csv", work / "night2.csv", url, count + count // 10, RELABEL_EVERY)
        scheduled, full = work / "scheduled", work / "full"
        runs = {"night 1": _night(ctx, scheduled, night1, "night1", statuses)}
        shutil.copytree(scheduled, full)
        runs["night 2 scheduled"] = _night(ctx, scheduled, night2, "night2-scheduled", statuses)
        runs["night 2 full rebuild"] = _night(ctx, full, night2, "night2-full", statuses,
                                              ["--full_rebuild", "--feature_store", str(work / "empty-store")])
    finally:
        server.shutdown()
        server.server_close()
    inc, reb = runs["night 2 scheduled"], runs["night 2 full rebuild"]
    ratio = inc["wall_s"] / reb["wall_s"]
    rows = [(name, r["wall_s"], r["cpu_s"], r["steps_s"].get("preprocess"), r["steps_s"].get("train"),
             r["wall_s"] - r["steps_s"].get("preprocess", 0) - r["steps_s"].get("train", 0),
             r["http_answers"].get("200", 0), r["http_answers"].get("304", 0),
             r["data"]["rows_fetched"], r["data"]["rows_reused"], r["features_extracted"], r["macro_f1"])
            for name, r in runs.items()]
    table = format_table(("run", "wall s", "CPU s", "preprocess s", "train s", "check + promote s", "HTTP 200", "HTTP 304",
                          "rows fetched", "rows reused", "features extracted", "test macro-F1"), rows,
                         f"`python -m pipelines.retrain`, {count:,} posters then +{count // 10:,} new and "
                         f"{-(-(count + count // 10) // RELABEL_EVERY):,} relabelled, over a local HTTP server")
    table += f"\nnight 2 scheduled / full rebuild: {ratio:.2f} of the wall time"
    summary = [summary_row("retrain night 2 (+10 % rows): scheduled / full rebuild wall time", f"{ratio:.2f}",
                           f"<= {TARGET_RATIO}", ratio <= TARGET_RATIO,
                           f"{inc['wall_s']:.0f} vs {reb['wall_s']:.0f} s; image bodies downloaded "
                           f"{inc['http_answers'].get('200', 0)} vs {reb['http_answers'].get('200', 0)}")]
    return {"measured": {"runs": runs, "ratio": ratio, "posters": count}, "summary": summary, "table": table}


def main(argv: Sequence[str] | None = None) -> int:
    return module_main(NAME, argv)


if __name__ == "__main__":
    sys.exit(main())
