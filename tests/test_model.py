"""trainer.model: strategy set-up, backbone loading and checks, head, distributed batch runs.

conftest.py has split the CPU into 2 logical devices, so every strategy here has 2 replicas.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tagbeam import dataset
from trainer import data
from trainer import model as model_lib

from backbone_factory import write_backbone
from dataset_factory import write_dataset

LABELS = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def strategy() -> tf.distribute.MirroredStrategy:
    return model_lib.setup_strategy(2)


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_backbone(str(tmp_path_factory.mktemp("bb") / "any_size"))


def test_strategy_accepts_an_already_split_cpu(strategy, caplog) -> None:
    assert strategy.num_replicas_in_sync == 2
    with caplog.at_level(logging.WARNING, logger="trainer.model"):
        again = model_lib.setup_strategy(3)  # too late to re-split: must not fail
    assert again.num_replicas_in_sync == 2
    assert "already split into 2 logical devices" in caplog.text


def test_gpus_get_nccl_all_reduce_mixed_precision_xla_and_larger_extraction_batches(monkeypatch) -> None:
    # No GPU here: only the device list is faked, to check what the trainer asks TensorFlow for.
    import json

    from trainer.config import TrainOptions

    listed = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["gpu0", "gpu1"] if kind == "GPU" else listed(kind))
    made = {}
    monkeypatch.setattr(tf.distribute, "MirroredStrategy", lambda **kwargs: made.setdefault("mirrored", kwargs))
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy",
                        lambda **kwargs: made.setdefault("multi_worker", kwargs))
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("CLUSTER_SPEC", raising=False)
    model_lib.setup_strategy(1)
    assert isinstance(made["mirrored"]["cross_device_ops"], tf.distribute.NcclAllReduce)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}))
    model_lib.setup_strategy(1)
    implementation = made["multi_worker"]["communication_options"].implementation
    assert implementation == tf.distribute.experimental.CommunicationImplementation.NCCL

    options = TrainOptions()
    gpus = model_lib.gpu_count()
    assert gpus == 2
    assert (options.device_precision(gpus), options.device_jit_compile(gpus), options.device_extraction_batch(gpus)) \
        == ("mixed_float16", True, 128)
    assert (options.device_precision(0), options.device_jit_compile(0), options.device_extraction_batch(0)) \
        == ("float32", False, 32)
    chosen = TrainOptions(precision="mixed_bfloat16", jit_compile="off", extraction_batch_size=48)
    assert (chosen.device_precision(gpus), chosen.device_jit_compile(gpus), chosen.device_extraction_batch(gpus)) \
        == ("mixed_bfloat16", False, 48)


def test_fixed_size_backbone_refuses_other_image_sizes(strategy, tmp_path) -> None:
    path = write_backbone(str(tmp_path / "fixed32"), input_size=32)
    with strategy.scope():
        backbone = model_lib.load_backbone(path)
    assert backbone.fixed_size == 32 and backbone.info["input_size"] == 32
    model_lib.check_image_size(backbone, 32)
    with pytest.raises(model_lib.BackboneError, match=r"--backbone .*fixed32 takes 32x32 .* 48x48.*--image_size 32"):
        model_lib.check_image_size(backbone, 48)


def test_any_size_backbone_only_warns_below_its_nominal_size(strategy, backbone_dir, caplog) -> None:
    with strategy.scope():
        backbone = model_lib.load_backbone(backbone_dir)
    assert backbone.fixed_size is None and backbone.nominal_size == 224
    with caplog.at_level(logging.WARNING, logger="trainer.model"):
        model_lib.check_image_size(backbone, 320)
        assert not caplog.text
        model_lib.check_image_size(backbone, 48)
    assert "trained at 224x224" in caplog.text
    assert isinstance(backbone.layer.weights[0], tf.distribute.DistributedValues)  # created in the scope: mirrored


@pytest.mark.parametrize("handle", [
    "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5",
    "/nonexistent/backbone",
])
def test_unreachable_handle_names_the_flag_and_the_way_out(strategy, handle, outbound_expected) -> None:
    with strategy.scope(), pytest.raises(model_lib.BackboneError) as caught:
        model_lib.load_backbone(handle)
    message = str(caught.value)
    assert message.startswith(f"--backbone {handle} cannot be loaded")
    assert "pick an embedded backbone (mobilenet_v2, efficientnet_lite0," in message and "local" in message
    assert "\n" not in message


def test_batch_runner_keeps_outputs_aligned_on_both_replicas(strategy, backbone_dir, tmp_path) -> None:
    root = write_dataset(str(tmp_path / "ds"), {"val": 35}, 24, LABELS, seed=2, shards=3)
    info = dataset.read(root)
    with strategy.scope():
        backbone = model_lib.load_backbone(backbone_dir)
    # 35 = 4 x 8 + 3: the short last batch is padded to 4 (2 replicas) and the padding dropped again.
    features, labels = model_lib.BatchRunner(strategy, backbone.features)(data.image_dataset(info, "val", 8))
    images, expected_labels = next(iter(data.image_dataset(info, "val", 35)))
    plain = tf.saved_model.load(backbone_dir)  # a second copy, outside any strategy
    # The batches are uint8; the backbone saw them as [0, 1] floats (converted inside the model).
    assert images.dtype == tf.uint8
    np.testing.assert_allclose(features, plain(tf.image.convert_image_dtype(images, tf.float32), False).numpy(), atol=1e-5)
    np.testing.assert_array_equal(labels, expected_labels.numpy())
    assert model_lib.feature_dim(strategy, backbone, 24) == features.shape[1] == 48
    assert tuple(strategy.run(backbone.features, args=(tf.zeros([0, 24, 24, 3], tf.uint8),)).values[0].shape) == (0, 48)


def test_fine_tuning_updates_only_the_top_backbone_variables(strategy, tmp_path) -> None:
    path = write_backbone(str(tmp_path / "tunable"))
    root = write_dataset(str(tmp_path / "ds"), {"train": 16}, 16, LABELS, seed=4)
    info = dataset.read(root)
    with strategy.scope():
        backbone = model_lib.load_backbone(path, trainable=True)
        head = model_lib.build_head(48, len(LABELS), hidden_units=8, seed=0)
        model = model_lib.build_classifier(backbone, head, 16, model_lib.FineTuneModel)
        tuned = model_lib.top_variables(backbone, 2)
        model.configure_fine_tuning(head.trainable_variables, tuned, tf_keras.optimizers.Adam(1e-2))
        model.compile(tf_keras.optimizers.Adam(1e-2), loss=tf_keras.losses.BinaryCrossentropy(from_logits=True))
    before = [v.numpy().copy() for v in backbone.loaded.trainable_variables]
    head_before = [v.numpy().copy() for v in head.trainable_variables]
    model.fit(data.image_dataset(info, "train", 8, training=True, seed=0), epochs=1, verbose=0)
    after = [v.numpy() for v in backbone.loaded.trainable_variables]
    changed = [not np.array_equal(b, a) for b, a in zip(before, after, strict=True)]
    assert changed == [False, False, True, True]  # kernel1, bias1 frozen; kernel2, bias2 tuned
    assert all(not np.array_equal(b, v.numpy()) for b, v in zip(head_before, head.trainable_variables, strict=True))
    with pytest.raises(model_lib.BackboneError, match="--fine_tune_layers 5: .* only 4 trainable variables"):
        model_lib.top_variables(backbone, 5)
