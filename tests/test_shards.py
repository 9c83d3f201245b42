"""TFRecord framing and shard arithmetic, checked against TensorFlow's own reader."""
from __future__ import annotations

import tensorflow as tf

from pipelines import shards


def test_gzip_tfrecords_written_via_beam_filesystems_read_back_with_tf(tmp_path):
    records = [b"", b"x", bytes(range(256)) * 300]
    path = str(tmp_path / "train-00000-of-00001.tfrecord.gz")
    size = shards.write_tfrecord_gz(path, records)
    assert size == (tmp_path / "train-00000-of-00001.tfrecord.gz").stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["train-00000-of-00001.tfrecord.gz"]  # no temporary left
    read = [r.numpy() for r in tf.data.TFRecordDataset(path, compression_type="GZIP")]
    assert read == records


def test_shard_count_follows_bytes_and_ids_spread_over_shards():
    mib = 2**20
    assert shards.shard_count(0, 64 * mib) == 1
    assert shards.shard_count(64 * mib, 64 * mib) == 1
    assert shards.shard_count(64 * mib + 1, 64 * mib) == 2
    assert shards.shard_count(1000 * mib, 64 * mib) == 16
    counts = [0] * 8
    for i in range(8000):
        counts[shards.shard_of(f"id-{i}", 8)] += 1
    assert min(counts) > 850 and max(counts) < 1150
    assert shards.shard_name("val", 2, 13) == "val-00002-of-00013.tfrecord.gz"
