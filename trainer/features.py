"""Backbone features shared across training runs, looked up by what determines them.

A frozen backbone's feature of an image depends only on the stored image bytes, the backbone (its
handle and files), the image size and decoding, and the TensorFlow build. So a scheduled retrain,
whose dataset is mostly last night's images (pipelines/reuse.py keeps their stored bytes
identical), needs to run the backbone only on the images it has not seen:

    <feature_store>/<model key>/key.json            what the model key stands for
    <feature_store>/<model key>/pack-<uuid>.npz     sha256 of stored image bytes -> float32 feature

Each run that extracts something adds one pack holding only what it extracted (written to a
temporary name and renamed: a killed run leaves no partial pack; two runs at once write two packs).
Labels never come from the store: they are read from the dataset, so relabelled rows train with
their new labels. Packs are never rewritten; delete the folder to reclaim the space. A pack that
cannot be read (cut short by a full disk or a killed upload, or not a pack) is a miss: it is
logged, renamed to `<pack>.bad-<UTC time>` and its images' features are extracted again.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from tagbeam import storage
from tagbeam.dataset import FEATURE_IMAGE, FEATURE_LABELS, DatasetInfo
from trainer import data

log = logging.getLogger(__name__)
_PACK_PREFIX = "pack-"
_KEY_BYTES = 32  # a sha256 digest


def _backbone_files_digest(path: str) -> str:
    """A digest of a local SavedModel's graph and variable index (a changed model changes them); a
    remote handle is identified by its name alone (TF Hub handles are versioned)."""
    if "://" in path or not os.path.isdir(path):
        return ""
    digest = hashlib.sha256()
    for name in ("saved_model.pb", os.path.join("variables", "variables.index")):
        file = os.path.join(path, name)
        if os.path.exists(file):
            with open(file, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def image_keys(info: DatasetInfo, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(sha256 digests [n, 32] of the stored images, float32 multi-hot [n, K]) of `split`, in the
    order `data.image_dataset` reads it for evaluation."""
    spec = {FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string),
            FEATURE_LABELS: tf.io.FixedLenFeature([info.num_labels], tf.int64)}
    keys, labels = [], []
    records = data.split_records(info, split).batch(512)
    for batch in records:
        parsed = tf.io.parse_example(batch, spec)
        keys += [hashlib.sha256(image).digest() for image in parsed[FEATURE_IMAGE].numpy()]
        labels.append(parsed[FEATURE_LABELS].numpy().astype(np.float32))
    digests = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, _KEY_BYTES)
    return digests, np.concatenate(labels) if labels else np.zeros((0, info.num_labels), np.float32)


def _read_pack(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys [n, 32] uint8, features [n, D] float32) of a pack; ValueError if it is not one."""
    with np.load(io.BytesIO(storage.read_bytes(path))) as pack:
        keys, features = pack["keys"], pack["features"]
    if keys.ndim != 2 or keys.shape[1] != _KEY_BYTES or keys.dtype != np.uint8:
        raise ValueError(f"keys of shape {keys.shape} and type {keys.dtype}, not [n, {_KEY_BYTES}] uint8")
    if features.ndim != 2 or len(features) != len(keys) or not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"features of shape {features.shape} and type {features.dtype} for {len(keys)} keys")
    return keys, features


class FeatureStore:
    """The features of one backbone at one image size, under `root` (local or gs://)."""

    def __init__(self, root: str, info: DatasetInfo, handle: str) -> None:
        key = {"handle": handle if "://" in handle else os.path.abspath(handle),
               "backbone_files": _backbone_files_digest(handle), "image_size": info.image_size,
               "stored_images": info.stored_images.to_json(), "tensorflow": tf.__version__}
        self.directory = storage.join(root, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])
        if not storage.exists(storage.join(self.directory, "key.json")):
            storage.write_json(storage.join(self.directory, "key.json"), key)
        self._known: dict[bytes, np.ndarray] | None = None

    def _load(self) -> dict[bytes, np.ndarray]:
        if self._known is None:
            self._known = {}
            for path in sorted(storage.match(storage.join(self.directory, f"{_PACK_PREFIX}*.npz"))):
                try:
                    keys, features = _read_pack(path)
                    width = next(iter(self._known.values())).shape[0] if self._known else features.shape[1]
                    if features.shape[1] != width:
                        raise ValueError(f"features of width {features.shape[1]}, the other packs' are {width}")
                except Exception as err:  # noqa: BLE001 - whatever a cut-short or foreign file raises
                    # A cache must never stop the job it speeds up: the pack's images are a miss, and
                    # the pack is moved out of the way so that it costs one extraction, not one a night.
                    log.warning("feature pack %s is unreadable (%s: %s): set aside as %s; its images' features "
                                "are extracted again", path, type(err).__name__, err, storage.set_aside(path))
                    continue
                for key, feature in zip(keys, features, strict=True):
                    self._known[key.tobytes()] = feature
        return self._known

    def _add(self, keys: np.ndarray, features: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, keys=keys, features=features)
        storage.write_bytes(storage.join(self.directory, f"{_PACK_PREFIX}{uuid.uuid4().hex}.npz"), buffer.getvalue())
        known = self._load()
        for key, feature in zip(keys, features, strict=True):
            known[key.tobytes()] = feature

    def split_features(self, info: DatasetInfo, split: str,
                       extract: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
        """(features, labels, how many were extracted) of `split`: the stored features of the images
        seen before, `extract(mask)` (the features of the examples where the bool mask is set, in
        order) for the others, which are then added to the store."""
        keys, labels = image_keys(info, split)
        known = self._load()
        missing = np.array([key.tobytes() not in known for key in keys], bool)
        extracted = extract(missing) if missing.any() else None
        if extracted is not None:
            if len(extracted) != int(missing.sum()):
                raise ValueError(f"{split}: extracted {len(extracted)} features for {int(missing.sum())} images")
            self._add(keys[missing], extracted)
        features = np.stack([known[key.tobytes()] for key in keys]) if len(keys) else np.zeros((0, 0), np.float32)
        log.info("%s: %d backbone features from the store %s, %d extracted", split, len(keys) - int(missing.sum()),
                 self.directory, int(missing.sum()))
        return features, labels, int(missing.sum())
