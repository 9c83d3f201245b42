"""TFRecord framing, shard arithmetic, the size sample and the run-merge shard writer, checked against
TensorFlow's own reader."""
from __future__ import annotations

import os

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.testing.util import assert_that, equal_to

from pipelines import dataset_info, shards
from pipelines.manifests import Row
from pipelines.splits import split_of
from pipelines.vocabulary import StatsFn
from tagbeam.dataset import to_example


@pytest.mark.parametrize("compression, tf_type", [("none", ""), ("gzip", "GZIP")])
def test_tfrecords_written_via_beam_filesystems_read_back_with_tf(tmp_path, compression, tf_type):
    records = [b"", b"x", bytes(range(256)) * 300]
    name = shards.shard_name("train", 0, 1, compression)
    size = shards.write_tfrecord(str(tmp_path / name), records, compression)
    assert size == (tmp_path / name).stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary left
    read = [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / name), compression_type=tf_type)]
    assert read == records
    assert (size < 300 * 256) == (compression == "gzip")  # the repeated bytes compress only under gzip


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
    assert shards.shard_name("val", 2, 13) == "val-00002-of-00013.tfrecord"
    assert shards.shard_name("val", 2, 13, "gzip") == "val-00002-of-00013.tfrecord.gz"


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


def test_runs_merge_by_id_in_several_passes_and_delete_only_intermediate_runs(tmp_path):
    run_dir = str(tmp_path / "runs.tmp-test")
    examples = [(f"id-{i:04d}", bytes([i % 256]) * (i % 7)) for i in range(200)]
    paths = []
    for r in range(9):  # nine runs, each a sorted, disjoint share of the ids
        paths.append(f"{run_dir}/run-{r}.run")
        shards.write_run(paths[-1], sorted(examples[r::9]))
    merged = list(shards.merge_runs(paths, run_dir, fan_in=2))  # 9 -> 5 -> 3 -> 2 runs, then the merge
    assert merged == sorted(examples)
    assert sorted(os.listdir(run_dir)) == [f"run-{r}.run" for r in range(9)]


def test_write_shards_merges_many_small_runs_into_sorted_shards(tmp_path):
    output = str(tmp_path / "out")
    records = {f"id-{i:03d}": f"record {i}".encode() * (1 + i % 5) for i in range(120)}
    keyed = [(("train", shards.shard_of(id_, 3), 3), (id_, record, (i % 2,)))
             for i, (id_, record) in enumerate(reversed(records.items()))]
    plan = shards.ShardPlan(["even", "odd"], {"train": 3, "val": 2}, {})
    with beam.Pipeline("FnApiRunner") as p:
        plan_pc = p | "Plan" >> beam.Create([plan])
        stats = (p | beam.Create(keyed, reshuffle=False)
                 | shards.WriteShards(output, plan_pc, buffer_bytes=200))  # a run every few examples
        assert_that(stats | beam.Map(lambda s: (s["split"], s["index"], s["examples"])),
                    equal_to([("train", i, sum(k[0][1] == i for k in keyed)) for i in range(3)]
                             + [("val", 0, 0), ("val", 1, 0)]))
    for i in range(3):
        path = os.path.join(output, shards.shard_name("train", i, 3))
        read = [r.numpy() for r in tf.data.TFRecordDataset(path)]
        assert read == [records[id_] for id_ in sorted(records) if shards.shard_of(id_, 3) == i]
    for i in range(2):  # planned shards no example went to are written, empty
        assert os.path.getsize(os.path.join(output, shards.shard_name("val", i, 2))) == 0  # exists, no record
    run_dirs = [n for n in os.listdir(output) if n.startswith(shards.RUNS_DIR_PREFIX)]
    assert len(run_dirs) == 1 and os.listdir(os.path.join(output, run_dirs[0])) == []  # merged runs deleted
    dataset_info.remove_temporaries(output)
    assert sorted(os.listdir(output)) == sorted(shards.shard_name(s, i, n) for s, n in (("train", 3), ("val", 2))
                                                for i in range(n))


def test_example_bytes_are_a_function_of_the_example():
    # Protobuf maps serialize in a per-process hash order unless asked for key order; shards hold
    # these bytes, so without it two runs on the same data write different shard files.
    record = to_example("tt01", b"\xff\xd8jpeg", (1,), 3)
    assert record.index(b"\x02id") < record.index(b"\x05image") < record.index(b"\x06labels")
    assert record == to_example("tt01", b"\xff\xd8jpeg", (1,), 3)
