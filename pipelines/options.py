"""The options of the Beam entry points, declared once (tagbeam.flags).

Which entry point takes which group:

| group | where | preprocess | predict | retrain |
|---|---|---|---|---|
| `ManifestOptions` | here | all | all but the label columns | forwarded to preprocess |
| `LabelOptions` | here | all | - | forwarded (but --vocab_file, which retrain sets) |
| `FetchOptions` | pipelines/fetch.py | all | all | forwarded |
| `ImageOptions` | pipelines/images.py | all | --max_image_pixels | forwarded |
| `SplitOptions` | here | all | - | forwarded |
| `ReuseOptions` | pipelines/reuse.py | all | - | forwarded (but --reuse_dataset, which retrain sets) |
| `OutputOptions` | here | all | all | set by retrain |
| `PredictOptions` | here | - | all | - |
| `RetrainOptions` | pipelines/retrain.py | - | - | all |
| `HealthOptions` | pipelines/health.py | - | - | all |
| `TrainOptions` | trainer/config.py | - | - | forwarded to trainer.task |

Any other argument must be one of Beam's pipeline options (--runner, --project, ...).
"""
from __future__ import annotations

import dataclasses

from tagbeam.dataset import SHARD_COMPRESSIONS, UNLABELED_POLICIES
from tagbeam.flags import check_fields, fraction, option, positive

MANIFEST_FORMATS = ("movie_genre", "planet", "voc", "generic")
PREDICTION_FORMATS = ("csv", "jsonl", "parquet")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ManifestOptions:
    """Input: the manifest and its layout."""

    input: str = option(help="manifest file, glob or gs:// URI; for VOC the VOC2012 root folder")
    format: str = option("auto", choices=("auto", *MANIFEST_FORMATS),
                         help="auto: MovieGenre header -> movie_genre, image_name,tags -> planet, a folder with "
                              "Annotations/ -> voc, any other CSV/JSONL/Parquet -> generic")
    uri_column: str = option("uri", help="generic manifests: the image URI column")
    labels_column: str = option("labels", help="generic manifests: the labels column, a list or a string split by "
                                               "--label_delimiter")
    id_column: str | None = option(None, help="generic manifests: the id column (default: the URI as written)")
    label_delimiter: str = option("|", help="generic manifests: separator of labels in a string cell")
    image_root: str | None = option(None, help="Planet image folder, gs:// or http(s):// prefix (default: train-jpg/ "
                                               "next to the manifest)")
    image_ext: str = option("jpg", help="Planet image extension (jpg or tif)")
    voc_image_set: str | None = option(None, help="VOC: use ImageSets/Main/<set>.txt (e.g. train, val, trainval); "
                                                  "default all annotations")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LabelOptions:
    """Labels: which labels the dataset keeps, in which order."""

    min_label_count: int = option(1, check=positive, help="keep labels used by at least this many rows")
    max_labels: int | None = option(None, check=positive, help="keep at most the N most frequent labels")
    vocab_file: str | None = option(None, help="a labels.txt fixing the label order (e.g. a production model's); "
                                               "unknown labels are ignored, --min_label_count and --max_labels too")
    unlabeled: str = option("reject", choices=UNLABELED_POLICIES,
                            help="rows with no known label: reject them, or keep them with all-zero labels")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SplitOptions:
    """Splits and shards."""

    val_fraction: float = option(0.1, check=fraction, help="share of rows in the val split (by a stable hash of the id)")
    test_fraction: float = option(0.1, check=fraction, help="share of rows in the test split")
    target_shard_mb: float = option(64.0, check=positive, help="target shard size in MiB (uncompressed)")
    shard_compression: str = option("none", choices=SHARD_COMPRESSIONS,
                                    help="none (the images are JPEG/PNG already, and every training read would pay "
                                         "to inflate them) or gzip")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.val_fraction + self.test_fraction > 1:
            raise ValueError(f"--val_fraction {self.val_fraction} and --test_fraction {self.test_fraction} must sum "
                             "to at most 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputOptions:
    """Output."""

    output: str = option(help="folder to write: local (when the workers run on this machine), gs:// or another file system they share")
    overwrite: bool = option(False, help="replace what a previous run of this job wrote in --output")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PredictOptions:
    """Prediction."""

    model: str = option(help="exported SavedModel: a version folder, an export base (the newest numeric version is "
                             "used), or a retraining workspace (its champion.json)")
    output_format: str = option("csv", choices=PREDICTION_FORMATS, help="format of the predictions-* files")
    batch_size: int = option(32, check=positive, help="images per model call")

