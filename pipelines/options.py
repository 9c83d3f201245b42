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
MANIFEST_FORMATS = ("movie_genre", "planet", "voc", "generic")
PREDICTION_FORMATS = ("csv", "jsonl", "parquet")


@group
class ManifestOptions:
    """Input: the manifest and its layout."""

    input: str = option(tags=[PREDICT], help="manifest file, glob or gs:// URI; for VOC the VOC2012 root folder")
    format: str = option("auto", tags=[PREDICT], choices=("auto", *MANIFEST_FORMATS),
                         help="auto: MovieGenre header -> movie_genre, image_name,tags -> planet, a folder with "
                              "Annotations/ -> voc, any other CSV/JSONL/Parquet -> generic")
    uri_column: str = option("uri", tags=[PREDICT], help="generic manifests: the image URI column")
    labels_column: str = option("labels", help="generic manifests: the labels column, a list or a string split by "
                                               "--label_delimiter")
    id_column: str | None = option(None, tags=[PREDICT], help="generic manifests: the id column (default: the URI as written)")
    label_delimiter: str = option("|", help="generic manifests: separator of labels in a string cell")
    image_root: str | None = option(None, tags=[PREDICT], help="Planet image folder, gs:// or http(s):// prefix (default: train-jpg/ "
                                               "next to the manifest)")
    image_ext: str = option("jpg", tags=[PREDICT], help="Planet image extension (jpg or tif)")
    voc_image_set: str | None = option(None, tags=[PREDICT], help="VOC: use ImageSets/Main/<set>.txt (e.g. train, val, trainval); "
                                                  "default all annotations")


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

    output: str = option(help="folder to write (local or gs://)")
    overwrite: bool = option(False, help="replace what a previous run of this job wrote in --output")


@group
class PredictOptions:
    """Prediction."""

    model: str = option(help="exported SavedModel: a version folder, an export base (the newest numeric version is "
                             "used), or a retraining workspace (its champion.json)")
    output_format: str = option("csv", choices=PREDICTION_FORMATS, help="format of the predictions-* files")
    batch_size: int = option(32, check=positive, help="images per model call")

