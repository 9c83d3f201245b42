"""docs/options.md, the reference of every option of every entry point, generated from the
option declarations (tagbeam.flags). `python -m pipelines.options_reference` rewrites it;
tests/test_contracts.py fails while it is stale."""
from __future__ import annotations

import sys
from pathlib import Path

from pipelines.options import ACCEPTANCE
from pipelines.predict import PredictJob
from pipelines.preprocess import PreprocessJob
from pipelines.retrain import RetrainJob
from tagbeam import flags
from trainer.config import TrainerJob

PATH = Path(__file__).resolve().parents[1] / "docs" / "options.md"
ENTRY_POINTS = {"pipelines.preprocess": PreprocessJob, "pipelines.predict": PredictJob,
                "pipelines.retrain": RetrainJob, "trainer.task": TrainerJob}
_HEADER = """# Option reference

Every flag of every entry point, with its type, default and help, generated from the one declaration of each
option (`tagbeam.flags.option` fields of `@tagbeam.flags.group` classes): do not edit by hand, run
`python -m pipelines.options_reference` after changing a declaration (tests/test_contracts.py fails while this
file is stale). `--help` of each entry point says the same. Any other argument of the Beam entry points must be
one of Beam's pipeline options (`--runner`, `--project`, ...).

"""


# What an option's tag means to a user.
TAG_NOTES = {ACCEPTANCE: "decides which images are accepted, so, like every image option, it is part of a dataset's "
                         "image fingerprint: --reuse_dataset reuses only a dataset made with the same value"}


def render() -> str:
    return _HEADER + flags.reference(ENTRY_POINTS, TAG_NOTES)


def main() -> int:
    PATH.write_text(render())
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
