"""The offline MobileNetV2 backbone: torch-free weight reader, faithful port, TF Hub-style export, cache."""

from __future__ import annotations

import collections
import io
import os
import pickle
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from trainer.hub import hub
import tf_keras
from PIL import Image
from skimage import data

from trainer import embedded_backbone as eb

REPO = Path(__file__).resolve().parents[1]
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


def _photo(image: np.ndarray, size: int = eb.INPUT_SIZE) -> np.ndarray:
    """Centre square crop resized to ``size``, RGB float in [0, 1]: the backbone's input contract."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(square.resize((size, size), Image.BILINEAR), np.float32) / 255.0


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    # A fresh cache: the tests must not depend on one left by an earlier run.
    path = str(tmp_path_factory.mktemp("tagbeam-cache"))
    start = time.perf_counter()
    eb.build(path)
    print(f"\nbuild took {time.perf_counter() - start:.1f} s")
    return path


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return np.stack([_photo(data.chelsea()), _photo(data.coffee())])


@pytest.fixture(scope="module")
def model() -> eb.MobileNetV2:
    return eb.load_model()


# --- reader ----------------------------------------------------------------------------------------


def test_reader_reads_torchvision_state_dict() -> None:
    state = eb.read_legacy_torch(eb.weights_path())
    params = {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert sum(v.size for v in params.values()) == 3_504_872  # torchvision's published MobileNetV2 size
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["features.2.conv.1.0.weight"].shape == (96, 1, 3, 3)  # depthwise
    assert state["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    assert state["features.0.1.running_var"].dtype == np.float32
    assert state["features.0.1.num_batches_tracked"].dtype == np.int64
    assert next(iter(state)) == "features.0.0.weight"  # order preserved


class _Storage:
    __module__ = "torch"
    __qualname__ = "FloatStorage"


def _rebuild_tensor_v2(*args: object) -> None:
    raise AssertionError("only pickled by reference")


_rebuild_tensor_v2.__module__ = "torch._utils"


def _legacy_file(path: Path, state: object, storages: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Write a legacy-format file the way torch did, with stand-ins registered under torch's names."""
    torch = types.ModuleType("torch")
    torch.FloatStorage = _Storage  # type: ignore[attr-defined]
    utils = types.ModuleType("torch._utils")
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if isinstance(obj, _StorageKey):
                return ("storage", _Storage, obj.key, "cpu", storages[obj.key].size, None)
            return None

    body = pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2)
    body += pickle.dumps({"protocol_version": 1001, "little_endian": True}, 2)
    buffer = io.BytesIO()
    Pickler(buffer, 2).dump(state)
    body += buffer.getvalue() + pickle.dumps(list(storages), 2)
    for array in storages.values():
        body += array.size.to_bytes(8, "little") + array.astype("<f4").tobytes()
    path.write_bytes(body)
    return path


class _StorageKey:
    def __init__(self, key: str) -> None:
        self.key = key


class _Tensor:
    def __init__(self, key: str, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.args = (_StorageKey(key), offset, shape, stride, False, collections.OrderedDict())

    def __reduce__(self) -> tuple:
        return (_rebuild_tensor_v2, self.args)


def test_reader_follows_offsets_and_strides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = np.arange(12, dtype=np.float32)
    state = collections.OrderedDict(t=_Tensor("k", 2, (2, 3), (1, 2)), s=_Tensor("k", 0, (), ()))
    read = eb.read_legacy_torch(_legacy_file(tmp_path / "ok.pth", state, {"k": base}, monkeypatch))
    np.testing.assert_array_equal(read["t"], [[2, 4, 6], [3, 5, 7]])
    assert read["s"].shape == () and read["s"] == 0


def test_reader_refuses_tensor_past_its_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"t": _Tensor("k", 0, (4, 4), (4, 1))}
    path = _legacy_file(tmp_path / "overrun.pth", state, {"k": np.zeros(12, np.float32)}, monkeypatch)
    with pytest.raises(ValueError, match="overruns"):
        eb.read_legacy_torch(path)


def test_reader_refuses_code_in_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    path = _legacy_file(tmp_path / "evil.pth", {"w": Exploit()}, {}, monkeypatch)
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        eb.read_legacy_torch(path)
    assert not marker.exists()


# --- the port --------------------------------------------------------------------------------------


def test_saved_classifier_recognises_real_photos(cache_dir: str, photos: np.ndarray) -> None:
    classifier = tf.saved_model.load(eb.classifier_path(cache_dir))
    probabilities = tf.nn.softmax(classifier(photos)).numpy()
    names = eb.imagenet_classes()
    (cat, cat_p), (coffee, coffee_p) = [(int(p.argmax()), float(p.max())) for p in probabilities]
    print(f"\nchelsea: {names[cat]} {cat_p:.3f}; coffee: {names[coffee]} {coffee_p:.3f}")
    assert cat in CAT_CLASSES and names[cat] in {"tabby, tabby cat", "tiger cat", "Egyptian cat"}
    assert cat_p > 0.6 and probabilities[0, sorted(CAT_CLASSES)].sum() > 0.9
    assert coffee == ESPRESSO and names[coffee] == "espresso"
    assert coffee_p > 0.95


def test_hub_layer_matches_in_memory_model(cache_dir: str, photos: np.ndarray, model: eb.MobileNetV2) -> None:
    handle = eb.build(cache_dir)
    inputs = tf_keras.Input([None, None, 3])
    layer = hub.KerasLayer(handle, trainable=False)
    keras_model = tf_keras.Model(inputs, layer(inputs))
    assert not layer.trainable_weights and len(layer.non_trainable_weights) == len(model.variables)
    odd_size = np.random.default_rng(0).random((3, 160, 200, 3), np.float32)  # not 224: any size is accepted
    for images in (photos, odd_size):
        features = keras_model.predict(images, verbose=0)
        assert features.shape == (len(images), eb.FEATURE_DIM)
        np.testing.assert_allclose(features, model.features(images).numpy(), atol=1e-4)


def test_saved_model_offers_tf_hub_reusable_api(cache_dir: str) -> None:
    loaded = tf.saved_model.load(eb.build(cache_dir))
    assert len(loaded.variables) == 260 and len(loaded.trainable_variables) == 156  # 52 conv+BN units
    assert list(loaded.regularization_losses) == []
    moving_mean = next(v for v in loaded.variables if "running_mean" in v.name)
    assert not moving_mean.trainable
    before = moving_mean.numpy().copy()
    images = np.random.default_rng(1).random((2, 64, 64, 3), np.float32)
    assert loaded(images, training=True).shape == (2, eb.FEATURE_DIM)
    assert not np.allclose(before, moving_mean.numpy())  # training=True updates BN statistics, as Keras BN does


def test_info_file_records_contract(cache_dir: str) -> None:
    info = eb.read_info(eb.build(cache_dir))
    assert (info["input_size"], info["output_dim"]) == (224, 1280)
    assert eb.read_info(eb.classifier_path(cache_dir))["output_dim"] == 1000


_STRATEGY_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer.hub import hub
import tf_keras
strategy = tf.distribute.MirroredStrategy()
with strategy.scope():
    inputs = tf_keras.Input([None, None, 3])
    outputs = tf_keras.layers.Dense(3, activation="sigmoid")(hub.KerasLayer(sys.argv[1], trainable=False)(inputs))
    model = tf_keras.Model(inputs, outputs)
    model.compile(tf_keras.optimizers.Adam(1e-3), "binary_crossentropy")
x = np.random.rand(4, 96, 96, 3).astype("float32")
history = model.fit(x, (x[:, 0, 0, :] > 0.5).astype("float32"), batch_size=4, epochs=1, verbose=0)
print("replicas", strategy.num_replicas_in_sync, "loss", history.history["loss"][0])
"""


def test_hub_layer_trains_a_head_under_mirrored_strategy(cache_dir: str) -> None:
    # A separate process: logical devices must be set before TensorFlow runs any op.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", _STRATEGY_SCRIPT, eb.build(cache_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas 2" in result.stdout


# --- cache -----------------------------------------------------------------------------------------


def test_second_build_reuses_cache(cache_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    handle = eb.build(cache_dir)
    stamp = os.stat(Path(handle, "saved_model.pb")).st_mtime_ns
    start = time.perf_counter()
    assert eb.build(cache_dir) == handle
    assert time.perf_counter() - start < 0.5
    assert os.stat(Path(handle, "saved_model.pb")).st_mtime_ns == stamp
    assert sorted(os.listdir(Path(handle).parent)) == [eb.CLASSIFIER_NAME, eb.FEATURE_VECTOR_NAME]  # no leftovers
    monkeypatch.setenv("TAGBEAM_CACHE_DIR", cache_dir)
    assert eb.default_handle() == handle


def test_cached_build_does_not_import_tensorflow(cache_dir: str) -> None:
    script = "import sys; from trainer.embedded_backbone import build; build(sys.argv[1]); print('tensorflow' in sys.modules)"
    command = [sys.executable, "-c", script, cache_dir]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "False", result.stderr
