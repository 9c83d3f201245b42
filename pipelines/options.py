"""The options of the Beam entry points, declared once (tagbeam.flags).

Which entry point takes which group (each entry point's job dataclass names its groups:
`flags.parts`), and every option's type, default and help: docs/options.md, generated from the
declarations by `python -m pipelines.options_reference`.

Any other argument must be one of Beam's pipeline options (--runner, --project, ...).
"""
from __future__ import annotations

from tagbeam.dataset import SHARD_COMPRESSIONS, UNLABELED_POLICIES
from tagbeam.flags import fraction, group, option, positive

# Option tags (tagbeam.flags.option(tags=...)): what else an option is part of.
PREDICT = "predict"  # pipelines.predict takes it too
ACCEPTANCE = "acceptance"  # it decides which sources are accepted: a dataset's image fingerprint holds it (reuse)
PREDICTION_FORMATS = ("csv", "jsonl", "parquet")


@group
class LabelOptions:
    """Labels: which labels the dataset keeps, in which order."""

    min_label_count: int = option(1, check=positive, help="keep labels used by at least this many rows")
    max_labels: int | None = option(None, check=positive, help="keep at most the N most frequent labels")
    vocab_file: str | None = option(None, help="a labels.txt fixing the label order (e.g. a production model's); "
                                               "unknown labels are ignored, --min_label_count and --max_labels too")
    unlabeled: str = option("reject", choices=UNLABELED_POLICIES,
                            help="rows with no known label: reject them, or keep them with all-zero labels")


@group
class SplitOptions:
    """Splits and shards."""

    val_fraction: float = option(0.1, check=fraction, help="share of rows in the val split (by a stable hash of the id)")
    test_fraction: float = option(0.1, check=fraction, help="share of rows in the test split")
    target_shard_mb: float = option(64.0, check=positive, help="target shard size in MiB (uncompressed)")
    shard_compression: str = option("none", choices=SHARD_COMPRESSIONS,
                                    help="none (the images are JPEG/PNG already, and every training read would pay "
                                         "to inflate them) or gzip")

    def validate(self) -> None:
        if self.val_fraction + self.test_fraction > 1:
            raise ValueError(f"--val_fraction {self.val_fraction} and --test_fraction {self.test_fraction} must sum "
                             "to at most 1")


@group
class OutputOptions:
    """Output."""

    output: str = option(help="folder to write: local (when the workers run on this machine), gs:// or another file system they share")
    overwrite: bool = option(False, help="replace what a previous run of this job wrote in --output")


@group
class PredictOptions:
    """Prediction."""

    model: str = option(help="exported SavedModel: a version folder, an export base (the newest numeric version is "
                             "used), or a retraining workspace (its champion.json)")
    output_format: str = option("csv", choices=PREDICTION_FORMATS, help="format of the predictions-* files")
    batch_size: int = option(32, check=positive, help="images per model call")

