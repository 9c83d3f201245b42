"""Writes tiny TF2 SavedModel image feature vectors for fast trainer tests.

The SavedModel follows the reusable-SavedModel contract that `hub.KerasLayer` loads
(`variables`, `trainable_variables`, `regularization_losses`, and a `__call__(images,
training)` traced for both values of `training`), so tests exercise the same loading code as
the embedded MobileNetV2 at a fraction of its cost. Random conv filters plus mean and max
pooling keep colour and blob information, which is what `dataset_factory` images encode.
`pooling="mean"` pools by the mean only and exports the feature map before it as
`tagbeam.export.BACKBONE_SPATIAL_FUNCTION`, like the embedded backbones (class activation maps).
"""
from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from tagbeam.export import BACKBONE_SPATIAL_FUNCTION


# AutoTrackable rather than tf.Module: tf.Module's `variables` are read-only properties that are
# not saved, while hub.KerasLayer needs them as saved attributes of the loaded object.
class _TinyBackbone(tf.__internal__.tracking.AutoTrackable):
    def __init__(self, seed: int, width: int, channels: int, input_size: int | None, pooling: str) -> None:
        super().__init__()
        self._pooling = pooling
        rng = np.random.default_rng(seed)

        def he(shape: tuple[int, ...]) -> tf.Variable:
            fan_in = int(np.prod(shape[:-1]))
            return tf.Variable(rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype("float32"))

        # Forward order, so "the top N variables" are the last N of this list.
        self.kernel1 = he((3, 3, 3, width))
        self.bias1 = tf.Variable(np.zeros(width, "float32"))
        self.kernel2 = he((3, 3, width, channels))
        self.bias2 = tf.Variable(np.zeros(channels, "float32"))
        self.trainable_variables = [self.kernel1, self.bias1, self.kernel2, self.bias2]
        self.variables = list(self.trainable_variables)
        self.regularization_losses: list = []
        spec = tf.TensorSpec([None, input_size, input_size, 3], tf.float32)
        self.__call__ = tf.function(self._forward)
        for training in (False, True):
            self.__call__.get_concrete_function(spec, training)
        if pooling == "mean":
            spatial = tf.function(self._spatial)
            spatial.get_concrete_function(spec)
            setattr(self, BACKBONE_SPATIAL_FUNCTION, spatial)

    def _spatial(self, images: tf.Tensor) -> tf.Tensor:
        x = tf.nn.relu(tf.nn.conv2d(images - 0.5, self.kernel1, 2, "SAME") + self.bias1)
        return tf.nn.relu(tf.nn.conv2d(x, self.kernel2, 2, "SAME") + self.bias2)

    def _forward(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        del training  # no batch norm or dropout: both modes compute the same features
        x = self._spatial(images)
        if self._pooling == "mean":
            return tf.reduce_mean(x, [1, 2])
        return tf.concat([tf.reduce_mean(x, [1, 2]), tf.reduce_max(x, [1, 2])], axis=-1)


def write_backbone(
    path: str,
    seed: int = 0,
    width: int = 12,
    channels: int = 24,
    input_size: int | None = None,
    nominal_size: int = 224,
    pooling: str = "mean_max",
) -> str:
    """Saves a tiny feature-vector SavedModel at `path` and returns `path`.

    `input_size=None` accepts any spatial size (like the embedded backbone); an int fixes the
    traced input signature to that size, the case in which the trainer must refuse a dataset of
    another image size. `tagbeam_backbone.json` beside `saved_model.pb` declares the sizes.
    """
    if pooling not in ("mean_max", "mean"):
        raise ValueError(f"pooling must be mean_max or mean, got {pooling!r}")
    module = _TinyBackbone(seed, width, channels, input_size, pooling)
    tf.saved_model.save(module, path)
    dim = channels if pooling == "mean" else 2 * channels
    meta = {"input_size": input_size or nominal_size, "output_dim": dim, "name": f"tiny-test-{pooling}"}
    with open(os.path.join(path, "tagbeam_backbone.json"), "w") as f:
        json.dump(meta, f)
    return path
