"""What the Beam entry points share: Beam's options with the local runner by default, and the
main() shape (one `error:` line and exit 2 for user mistakes)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from tagbeam import flags

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
