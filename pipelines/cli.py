"""What the Beam entry points share on the command line: one-line errors and the main() shape."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.manifests import UsageError

# Beam 2.77's DirectRunner first tries the Prism runner, which downloads a binary from GitHub (a
# surprise outbound connection, and a wait where there is no internet) before falling back to the
# FnApiRunner for batch pipelines like ours. Without --runner we go to the FnApiRunner directly; it
# honours --direct_num_workers and --direct_running_mode.
LOCAL_RUNNER = "FnApiRunner"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other user error of these tools (argparse would add the usage).
        self.exit(2, f"error: {message} (see --help)\n")


def pipeline_options(pipeline_args: Sequence[str]) -> PipelineOptions:
    """Beam options from the flags the entry point did not know; the local runner by default."""
    options = PipelineOptions(list(pipeline_args), save_main_session=False)
    standard = options.view_as(StandardOptions)
    if standard.runner is None:
        standard.runner = LOCAL_RUNNER
    return options


def main(build_parser: Callable[[], argparse.ArgumentParser],
         run: Callable[[argparse.Namespace, list[str]], Any], argv: Sequence[str] | None) -> int:
    """Parses known flags (the rest are Beam's PipelineOptions), runs, and turns a UsageError into
    one `error:` line and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipelines").setLevel(logging.INFO)
    try:
        args, pipeline_args = build_parser().parse_known_args(argv)
    except SystemExit as done:  # --help, or a flag error already printed as one line
        return int(done.code or 0)
    try:
        run(args, pipeline_args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
