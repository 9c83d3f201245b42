"""TFRecord framing, shard arithmetic and the size sample, checked against TensorFlow's own reader."""
from __future__ import annotations

import tensorflow as tf

from pipelines import shards
from pipelines.manifests import Row
from pipelines.splits import split_of
from pipelines.vocabulary import StatsFn


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


def test_shard_plan_scales_the_sample_mean_per_row_by_each_split_rows():
    mib = 2**20
    # Mean over sampled rows, a rejected one counting 0: (3 + 0 + 5 + 4) / 4 = 3 MiB per row.
    sample = [3 * mib, 0, 5 * mib, 4 * mib]
    plan = shards.plan_shard_counts({"train": 100, "val": 10, "test": 0}, sample, 64 * mib)
    assert plan == {"train": 5, "val": 1}  # 300 MiB -> 5 shards; 30 MiB -> 1; no rows -> no shards
    assert shards.plan_shard_counts({"train": 7}, [0, 0], 64 * mib) == {"train": 1}


def test_stats_sample_is_the_same_whatever_the_partitioning():
    rows = [Row("m.csv", i + 1, f"id-{i}", f"/img/{i}.jpg", "/img", ("a",) if i % 3 else ("a", "b"))
            for i in range(500)]
    fn = StatsFn(0.1, 0.2)

    def combine(parts: list[list[Row]]) -> dict:
        accs = []
        for part in parts:
            acc = fn.create_accumulator()
            for row in part:
                acc = fn.add_input(acc, ("rows", row))
                acc = fn.add_input(acc, ("read", row))
            accs.append(acc)
        return fn.extract_output(fn.merge_accumulators(accs))

    one, many = combine([rows]), combine([rows[i::7] for i in range(7)])
    expected = sorted(rows, key=lambda r: shards.sample_key(r.id))[: shards.SAMPLE_ROWS]
    assert one["sample"] == many["sample"] == expected
    assert one["rows_per_split"] == many["rows_per_split"]
    assert sum(one["rows_per_split"].values()) == one["rows"] == one["input_rows"] == 500
    assert one["rows_per_split"]["test"] == sum(split_of(r.id, 0.1, 0.2) == "test" for r in rows)
    assert one["label_counts"] == {"a": 500, "b": 167}
