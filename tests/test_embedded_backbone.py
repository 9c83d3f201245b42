"""The offline backbones: torch-free weight reader, faithful ports, TF Hub-style export, cache."""

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
import tf_keras
from PIL import Image
from skimage import data

from tagbeam.export import BACKBONE_SPATIAL_FUNCTION
from trainer import embedded_backbone as eb
from trainer.hub import hub

REPO = Path(__file__).resolve().parents[1]
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


MNV2 = "mobilenet_v2"
LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _photo(image: np.ndarray, size: int = eb.BACKBONES["mobilenet_v2"].input_size) -> np.ndarray:
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
    return eb.load_model(MNV2)


# --- reader ----------------------------------------------------------------------------------------


def test_reader_reads_torchvision_state_dict() -> None:
    state = eb.read_legacy_torch(eb.weights_path(MNV2))
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
    classifier = tf.saved_model.load(eb.classifier_path(cache_dir, MNV2))
    probabilities = tf.nn.softmax(classifier(photos)).numpy()
    names = eb.imagenet_classes()
    (cat, cat_p), (coffee, coffee_p) = [(int(p.argmax()), float(p.max())) for p in probabilities]
    print(f"\nchelsea: {names[cat]} {cat_p:.3f}; coffee: {names[coffee]} {coffee_p:.3f}")
    assert cat in CAT_CLASSES and names[cat] in {"tabby, tabby cat", "tiger cat", "Egyptian cat"}
    assert cat_p > 0.6 and probabilities[0, sorted(CAT_CLASSES)].sum() > 0.9
    assert coffee == ESPRESSO and names[coffee] == "espresso"
    assert coffee_p > 0.95


def test_hub_layer_matches_in_memory_model(cache_dir: str, photos: np.ndarray, model: eb.MobileNetV2) -> None:
    handle = eb.build(cache_dir, name=MNV2)
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
    loaded = tf.saved_model.load(eb.build(cache_dir, name=MNV2))
    assert len(loaded.variables) == 260 and len(loaded.trainable_variables) == 156  # 52 conv+BN units
    assert list(loaded.regularization_losses) == []
    moving_mean = next(v for v in loaded.variables if "running_mean" in v.name)
    assert not moving_mean.trainable
    before = moving_mean.numpy().copy()
    images = np.random.default_rng(1).random((2, 64, 64, 3), np.float32)
    assert loaded(images, training=True).shape == (2, eb.FEATURE_DIM)
    assert not np.allclose(before, moving_mean.numpy())  # training=True updates BN statistics, as Keras BN does


def test_info_file_records_contract(cache_dir: str) -> None:
    info = eb.read_info(eb.build(cache_dir, name=MNV2))
    assert (info["input_size"], info["output_dim"]) == (224, 1280)
    assert (info["backbone"], info["spatial_function"]) == ("mobilenet_v2", BACKBONE_SPATIAL_FUNCTION)
    assert eb.read_info(eb.classifier_path(cache_dir, MNV2))["output_dim"] == 1000


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
    assert Path(handle).parent.parent.name == eb.CACHE_VERSION
    monkeypatch.setenv("TAGBEAM_CACHE_DIR", cache_dir)
    assert eb.default_handle() == handle


def test_cached_build_does_not_import_tensorflow(cache_dir: str) -> None:
    script = "import sys; from trainer.embedded_backbone import build; build(sys.argv[1]); print('tensorflow' in sys.modules)"
    command = [sys.executable, "-c", script, cache_dir]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "False", result.stderr


# --- the EfficientNet-Lite ports and what every embedded backbone exports ----------------------------

# Each port's probabilities on the two photos: the top classes were checked by name (a cat class,
# espresso) when they were first recorded. They pin the port: measured with TF's 'SAME' padding
# replaced by torch's symmetric padding, or with BN epsilon 1e-5 instead of 1e-3, one of them moves by
# 0.013-0.11 (the top-1 class itself often survives such a mistake, so the classes alone would not
# catch it).
LITE_PROBABILITIES = {  # (P(cat classes) for chelsea, P(espresso) for coffee)
    "efficientnet_lite0": (0.887, 0.944),
    "efficientnet_lite1": (0.843, 0.608),
    "efficientnet_lite2": (0.835, 0.897),
}


@pytest.mark.parametrize("name", LITES)
def test_lite_port_recognises_real_photos(name: str) -> None:
    model = eb.load_model(name)
    size = eb.BACKBONES[name].input_size
    photos = np.stack([_photo(data.chelsea(), size), _photo(data.coffee(), size)])
    probabilities = tf.nn.softmax(model.logits(photos)).numpy()
    names = eb.imagenet_classes()
    cat, coffee = (int(p.argmax()) for p in probabilities)
    cat_p, espresso_p = float(probabilities[0, sorted(CAT_CLASSES)].sum()), float(probabilities[1, ESPRESSO])
    print(f"\n{name}: chelsea {names[cat]} (cats {cat_p:.3f}); coffee {names[coffee]} {espresso_p:.3f}")
    assert cat in CAT_CLASSES and coffee == ESPRESSO
    np.testing.assert_allclose((cat_p, espresso_p), LITE_PROBABILITIES[name], atol=0.006)


def test_lite_reader_maps_every_weight() -> None:
    # The port refuses unused state-dict entries, so building is the check; the counts are the
    # published parameter counts of the converted checkpoints (classifier included).
    for name, params in zip(LITES, (4_652_008, 5_416_680, 6_092_072), strict=True):
        state = eb.read_legacy_torch(eb.weights_path(name))
        assert sum(v.size for k, v in state.items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))) == params


@pytest.mark.parametrize("name", list(eb.BACKBONES))
def test_spatial_features_pool_to_the_feature_vector(cache_dir: str, name: str) -> None:
    handle = eb.build(cache_dir, name=name)
    loaded = tf.saved_model.load(handle)
    # 100 px: not a multiple of 32, so stride-2 padding (symmetric or TF 'SAME') shapes the map.
    images = np.random.default_rng(2).random((2, 100, 100, 3), np.float32)
    spatial = getattr(loaded, BACKBONE_SPATIAL_FUNCTION)(images).numpy()
    assert spatial.shape == (2, 4, 4, eb.FEATURE_DIM)
    np.testing.assert_allclose(spatial.mean(axis=(1, 2)), loaded(images, training=False).numpy(), atol=1e-5)
    info = eb.read_info(handle)
    assert (info["backbone"], info["input_size"]) == (name, eb.BACKBONES[name].input_size)


def test_fine_tuning_trains_the_top_of_a_lite_backbone(cache_dir: str) -> None:
    """--fine_tune_layers N unfreezes the last N trainable variables: for EfficientNet-Lite, the
    1x1 head conv to 1280 and its BN scale and offset come last."""
    from trainer import model as model_lib

    backbone = model_lib.load_backbone(eb.build(cache_dir, name="efficientnet_lite0"), trainable=True)
    top = model_lib.top_variables(backbone, 3)
    assert [v.name for v in top] == ["conv_head.weight:0", "bn1.weight:0", "bn1.bias:0"]
    below = backbone.loaded.trainable_variables[-4]
    head = model_lib.build_head(eb.FEATURE_DIM, 2, seed=0)
    model = model_lib.build_classifier(backbone, head, 64, model_lib.FineTuneModel)
    model.configure_fine_tuning(head.trainable_variables, top, tf_keras.optimizers.Adam(1e-2))
    model.compile(tf_keras.optimizers.Adam(1e-2), tf_keras.losses.BinaryCrossentropy(from_logits=True))
    before = [v.numpy().copy() for v in (*top, below)]
    images = np.random.default_rng(3).integers(0, 255, (4, 64, 64, 3), np.uint8)
    model.fit(images, np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32), epochs=1, verbose=0)
    assert all(not np.allclose(b, v.numpy()) for b, v in zip(before[:-1], top, strict=True))
    np.testing.assert_array_equal(before[-1], below.numpy())


def test_every_embedded_backbone_is_pinned_for_fresh_machines() -> None:
    # setup_env.sh, smoke.sh and the trainer image install scripts/asset-packages.txt.
    pinned = (REPO / "scripts" / "asset-packages.txt").read_text().split()
    assert all(spec.package in pinned for spec in eb.BACKBONES.values())
