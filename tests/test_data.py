"""trainer.data: reading dataset directories written to docs/dataset.md."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tagbeam import dataset
from trainer import data

from dataset_factory import write_dataset

LABELS = ["circle", "square", "triangle", "cross"]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("data") / "ds")
    return write_dataset(root, {"train": 40, "val": 12, "test": 0}, 24, LABELS, seed=3, shards=3)


def test_reads_contract_and_yields_every_example_once(dataset_dir: str) -> None:
    info = dataset.read(dataset_dir)
    assert info.labels == tuple(LABELS) and info.image_size == 24 and info.image_format == "jpeg"
    assert info.split("train").examples == 40 and len(info.shard_paths("train")) == 3
    assert info.split("test").examples == 0 and info.split("missing").examples == 0

    batches = list(data.image_dataset(info, "train", 16))
    assert [b[0].shape[0] for b in batches] == [16, 16, 8]  # global batches, the last one partial
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    # uint8 as stored (the model converts): a float batch would be 4x the bytes to build and ship.
    assert images.shape == (40, 24, 24, 3) and images.dtype == np.uint8 and images.max() > 200
    assert labels.dtype == np.float32
    # The label counts dataset.json records were computed by the writer, not by this reader.
    np.testing.assert_array_equal(labels.sum(axis=0), info.label_count_vector("train"))
    assert set(np.unique(labels)) <= {0.0, 1.0} and labels.sum(axis=1).min() >= 1


def _epoch(info: dataset.DatasetInfo, **kwargs) -> list[bytes]:
    """One pass over the train split as a list of image fingerprints, in the order yielded."""
    images = np.concatenate([x for x, _ in data.image_dataset(info, "train", 8, **kwargs)])
    return [image.tobytes() for image in images]


def test_training_order_is_shuffled_and_repeatable_with_a_seed(dataset_dir: str) -> None:
    info = dataset.read(dataset_dir)
    stored = _epoch(info)
    first = _epoch(info, training=True, seed=7)
    assert first == _epoch(info, training=True, seed=7)
    assert first != _epoch(info, training=True, seed=8)
    assert first != stored and sorted(first) == sorted(stored) and len(set(stored)) == 40
    assert stored == _epoch(info)  # evaluation order is the stored order, every time


def test_dihedral_augmentation_only_moves_pixels(dataset_dir: str) -> None:
    info = dataset.read(dataset_dir)
    plain = list(data.image_dataset(info, "val", 12, training=True, seed=5))[0]
    augmented = list(data.image_dataset(info, "val", 12, training=True, seed=5, augment="dihedral"))[0]
    np.testing.assert_array_equal(plain[1], augmented[1])
    changed = 0
    for image, moved in zip(plain[0].numpy(), augmented[0].numpy(), strict=True):
        variants = [np.rot90(v, k) for v in (image, image[:, ::-1]) for k in range(4)]
        assert any(np.array_equal(moved, v) for v in variants)
        changed += not np.array_equal(moved, image)
    assert changed > 0


def test_png_datasets_decode(tmp_path) -> None:
    root = write_dataset(str(tmp_path / "png"), {"train": 5}, 16, LABELS[:3], seed=1, image_format="png")
    info = dataset.read(root)
    images, labels = next(iter(data.image_dataset(info, "train", 5)))
    assert images.shape == (5, 16, 16, 3) and labels.shape == (5, 3)
    assert info.stored_images.jpeg is None  # nothing for serving to re-encode


def test_older_datasets_read_as_what_they_hold(tmp_path) -> None:
    root = write_dataset(str(tmp_path / "ds"), {"train": 2}, 16, LABELS, seed=1)
    path = os.path.join(root, "dataset.json")
    meta = json.load(open(path))
    assert dataset.read(root).stored_images.jpeg == (95, "4:2:0")
    # Written before the pipeline recorded these: 4:4:4 JPEGs in GZIP shards.
    del meta["jpeg_subsampling"], meta["shard_compression"]
    json.dump(meta, open(path, "w"))
    info = dataset.read(root)
    assert info.stored_images.jpeg == (95, "4:4:4") and info.compression_type == "GZIP"
    assert len(list(data.image_dataset(info, "train", 2).unbatch())) == 2
    meta["shard_compression"] = "zstd"
    json.dump(meta, open(path, "w"))
    with pytest.raises(dataset.DatasetError, match="shard_compression 'zstd' is not one of"):
        dataset.read(root)


def test_missing_dataset_json_says_to_run_the_pipeline(tmp_path) -> None:
    with pytest.raises(dataset.DatasetError, match=r"no dataset\.json.*python -m pipelines\.preprocess"):
        dataset.read(str(tmp_path))


def test_inconsistent_directories_are_refused(tmp_path) -> None:
    root = write_dataset(str(tmp_path / "ds"), {"train": 4}, 16, LABELS, seed=1, shards=2)
    with open(os.path.join(root, "labels.txt"), "w") as f:
        f.write("circle\nsquare\ncross\ntriangle\n")
    with pytest.raises(dataset.DatasetError, match="labels.txt.*disagrees"):
        dataset.read(root)

    root = write_dataset(str(tmp_path / "ds2"), {"train": 4}, 16, LABELS, seed=1, shards=2)
    os.remove(os.path.join(root, "train-00001-of-00002.tfrecord.gz"))
    with pytest.raises(dataset.DatasetError, match="missing.*train-00001-of-00002"):
        dataset.read(root)

    root = write_dataset(str(tmp_path / "ds3"), {"train": 4}, 16, LABELS, seed=1)
    meta = json.load(open(os.path.join(root, "dataset.json")))
    del meta["image_size"]
    json.dump(meta, open(os.path.join(root, "dataset.json"), "w"))
    with pytest.raises(dataset.DatasetError, match="'image_size'"):
        dataset.read(root)
