"""trainer/features.py: backbone features shared by runs, looked up by stored image bytes."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from backbone_factory import write_backbone
from dataset_factory import write_dataset
from job_runs import train as run_trainer

LABELS = ["circle", "square", "triangle", "cross"]


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_backbone(str(tmp_path_factory.mktemp("backbone") / "tiny"))


def _grown(base: str, extra: str, out: str, relabel: int) -> str:
    """`base` with the first `relabel` train examples' labels inverted and `extra`'s train examples
    added: what a retrain's dataset is to the last one (same images, new labels, a few new images)."""
    os.makedirs(out)
    meta = json.load(open(os.path.join(base, "dataset.json")))
    more = json.load(open(os.path.join(extra, "dataset.json")))
    files = []
    for source, prefix in ((base, "old"), (extra, "new")):
        for i, name in enumerate(json.load(open(os.path.join(source, "dataset.json")))["splits"]["train"]["files"]):
            target = f"train-{prefix}{i}.tfrecord.gz"
            with tf.io.TFRecordWriter(os.path.join(out, target), "GZIP") as writer:
                for k, record in enumerate(tf.data.TFRecordDataset(os.path.join(source, name), "GZIP")):
                    example = tf.train.Example.FromString(record.numpy())
                    labels = example.features.feature["labels"].int64_list.value
                    if prefix == "old" and i == 0 and k < relabel:
                        labels[:] = [1 - v for v in labels] if 0 < sum(labels) < len(labels) else labels
                    writer.write(example.SerializeToString())
            files.append(target)
    for split in ("val", "test"):
        for name in meta["splits"][split]["files"]:
            tf.io.gfile.copy(os.path.join(base, name), os.path.join(out, name))
    train = meta["splits"]["train"]
    train.update(files=files, shards=len(files), examples=train["examples"] + more["splits"]["train"]["examples"])
    train["label_counts"] = {label: 0 for label in LABELS}  # recounted below
    counts = np.zeros(len(LABELS), int)
    for name in files:
        for record in tf.data.TFRecordDataset(os.path.join(out, name), "GZIP"):
            counts += np.array(tf.train.Example.FromString(record.numpy()).features.feature["labels"].int64_list.value)
    train["label_counts"] = dict(zip(LABELS, counts.tolist(), strict=True))
    meta["input_rows"] = sum(s["examples"] for s in meta["splits"].values())
    json.dump(meta, open(os.path.join(out, "dataset.json"), "w"))
    open(os.path.join(out, "labels.txt"), "w").write("".join(f"{label}\n" for label in LABELS))
    return out


def test_a_second_run_extracts_only_the_images_it_has_not_seen(tiny_backbone, tmp_path):
    night1 = write_dataset(str(tmp_path / "night1"), {"train": 64, "val": 24, "test": 24}, 32, LABELS, seed=3)
    extra = write_dataset(str(tmp_path / "extra"), {"train": 8}, 32, LABELS, seed=4)
    night2 = _grown(night1, extra, str(tmp_path / "night2"), relabel=6)
    store = str(tmp_path / "features")

    def train(data_dir: str, name: str, *flags: str) -> dict:
        return run_trainer(["--data_dir", data_dir, "--model_dir", str(tmp_path / name), "--hub_handle",
                            tiny_backbone, "--epochs", "5", "--batch_size", "32", "--seed", "2", *flags]).run_info

    first = train(night1, "m1", "--feature_store", store)
    assert first["timings"]["feature_extraction_images"] == 64 + 24 + 24
    second = train(night2, "m2", "--feature_store", store)
    assert second["timings"]["feature_extraction_images"] == 8  # only the new images
    fresh = train(night2, "m3")  # no store: every image through the backbone
    assert fresh["timings"]["feature_extraction_images"] == 64 + 8 + 24 + 24
    # The same features and the dataset's own (new) labels: the same model as without the store.
    for name in ("train", "val", "test"):
        from_store = [np.load(tmp_path / "m2" / "feature_cache" / d / f"{name}-{kind}.npy")
                      for d in os.listdir(tmp_path / "m2" / "feature_cache") for kind in ("features", "labels")]
        fresh_arrays = [np.load(tmp_path / "m3" / "feature_cache" / d / f"{name}-{kind}.npy")
                        for d in os.listdir(tmp_path / "m3" / "feature_cache") for kind in ("features", "labels")]
        assert len(from_store) == len(fresh_arrays) == 2
        for a, b in zip(from_store, fresh_arrays, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert json.load(open(tmp_path / "m2" / "metrics.json")) == json.load(open(tmp_path / "m3" / "metrics.json"))


def test_a_cut_short_pack_costs_one_recomputation_not_every_night(tiny_backbone, tmp_path, caplog):
    # A full disk or a killed upload: the store must never stop the training it speeds up.
    import logging

    data_dir = write_dataset(str(tmp_path / "night1"), {"train": 32, "val": 8, "test": 8}, 32, LABELS, seed=5)
    store = tmp_path / "features"

    def train(name: str) -> dict:
        return run_trainer(["--data_dir", data_dir, "--model_dir", str(tmp_path / name), "--hub_handle",
                            tiny_backbone, "--epochs", "2", "--batch_size", "16", "--feature_store", str(store)]).run_info

    assert train("m1")["timings"]["feature_extraction_images"] == 48
    packs = sorted(store.glob("*/pack-*.npz"))  # one per split
    assert len(packs) == 3
    pack = packs[0]
    with np.load(pack) as content:
        lost = len(content["keys"])
    pack.write_bytes(pack.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="trainer.features"):
        assert train("m2")["timings"]["feature_extraction_images"] == lost  # those images, recomputed
    (line,) = [r.getMessage() for r in caplog.records if str(pack) in r.getMessage()]
    assert "unreadable" in line and "set aside" in line
    assert not pack.exists() and len(list(pack.parent.glob(pack.name + ".bad-*"))) == 1
    caplog.clear()
    assert train("m3")["timings"]["feature_extraction_images"] == 0  # one bad pack, one recomputation
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "features" in r.name]


def test_a_cut_feature_cache_entry_is_a_miss_and_is_set_aside(tiny_backbone, tmp_path, caplog):
    import logging
    import types

    from tagbeam import dataset
    from trainer.train import FeatureCache

    info = dataset.read(write_dataset(str(tmp_path / "data"), {"train": 4, "val": 2, "test": 2}, 32, LABELS, seed=6))
    cache = FeatureCache(str(tmp_path / "feature_cache"), info, types.SimpleNamespace(path=tiny_backbone))
    features, labels = np.ones((4, 8), np.float32), np.zeros((4, len(LABELS)), np.float32)
    cache.save("train", features, labels)
    (entry,) = (tmp_path / "feature_cache").glob("*/train-features.npy")
    entry.write_bytes(entry.read_bytes()[:60])
    with caplog.at_level(logging.WARNING, logger="trainer.train"):
        assert cache.load("train") is None
    (line,) = [r.getMessage() for r in caplog.records if r.name == "trainer.train"]
    assert "unreadable" in line and "extracting again" in line
    assert not entry.exists() and len(list(entry.parent.glob("train-*.npy.bad-*"))) == 2
    cache.save("train", features, labels)
    np.testing.assert_array_equal(cache.load("train")[0], features)
