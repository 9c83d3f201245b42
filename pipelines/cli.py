"""What the Beam entry points share: Beam's options with the local runner by default, and the
main() shape (one `error:` line and exit 2 for user mistakes)."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from tagbeam import flags, storage
from tagbeam.dataset import OUTPUT_MARKER

# Beam 2.77's DirectRunner first tries the Prism runner, which downloads a binary from GitHub (a
# surprise outbound connection, and a wait where there is no internet) before falling back to the
# FnApiRunner for batch pipelines like ours. Without --runner we go to the FnApiRunner directly; it
# honours --direct_num_workers and --direct_running_mode.
LOCAL_RUNNER = "FnApiRunner"
Job = TypeVar("Job")


def pipeline_options(pipeline_args: Sequence[str]) -> PipelineOptions:
    """Beam options from the arguments that were checked to be Beam's; the local runner by default."""
    options = PipelineOptions(list(pipeline_args), save_main_session=False)
    standard = options.view_as(StandardOptions)
    if standard.runner is None:
        standard.runner = LOCAL_RUNNER
    return options


def main(parse: Callable[[Sequence[str] | None], tuple[Job, list[str]]],
         run: Callable[[Job, list[str]], Any], argv: Sequence[str] | None) -> int:
    """Parses the flags (the rest must be Beam's options), runs, and turns a UsageError into one
    `error:` line and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipelines").setLevel(logging.INFO)
    try:
        job, pipeline_args = parse(argv)
    except SystemExit as done:  # --help, or a flag error already printed as one line
        return int(done.code or 0)
    return flags.run_main(lambda: run(job, pipeline_args))


def claim_output(output: str, overwrite: bool, entry_point: str) -> bool:
    """Makes `output` a folder of this job's, before anything is written or removed there.

    Refuses (UsageError) a path that is a file, a place that cannot be written, and a non-empty folder
    that no tagbeam job wrote (no OUTPUT_MARKER) unless `overwrite`: a job removes only what it can
    prove it wrote. Returns whether the folder was a tagbeam job's before (its left-overs may go).
    """
    if not storage.is_remote(output) and os.path.exists(output) and not os.path.isdir(output):
        raise flags.UsageError(f"--output {output} is a file; give a folder (new or empty, or one this job wrote)")
    marker = storage.join(output, OUTPUT_MARKER)
    ours = storage.exists(marker)
    if storage.is_remote(output):
        others = [p for p in storage.match(storage.join(output, "**")) if not p.endswith("/" + OUTPUT_MARKER)]
    else:
        others = sorted(os.listdir(output)) if os.path.isdir(output) else []
        others = [name for name in others if name != OUTPUT_MARKER]
    if others and not ours and not overwrite:
        shown = ", ".join(p.rstrip("/").rsplit("/", 1)[-1] for p in others[:3])
        raise flags.UsageError(f"--output {output} holds files no tagbeam job wrote ({shown}{', ...' if len(others) > 3 else ''}); "
                               "choose a new or empty folder, or pass --overwrite to let this job replace its own kind "
                               "of files there")
    try:
        storage.write_json(marker, {"written_by": entry_point})
    except Exception as err:  # noqa: BLE001 - OSError locally, the store's own errors elsewhere
        raise flags.UsageError(f"--output {output} cannot be written ({type(err).__name__}: {err}); "
                               "choose a folder you can write") from None
    return ours
