"""Incremental preprocessing (pipelines/reuse.py) against the fault server with ETag/Last-Modified:
what is fetched, what is reused, and that the result is the bytes a full rebuild writes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tagbeam.dataset import Source

from dataset_factory import label_names, read_examples
from fault_server import FaultServer, Response
from image_factory import noise_image
from job_runs import preprocess as run

# Above the shard plan's 32-row size sample, so rows take both paths: the plan's and EncodeRows'.
ROWS = 60
COMMON = ["--allow_loopback", "--fetch_timeout_s", "2", "--fetch_retries", "0", "--image_size", "32",
          "--id_column", "key", "--val_fraction", "0.2", "--test_fraction", "0.2", "--target_shard_mb", "0.01"]


def jpeg(seed: int) -> bytes:
    return noise_image(seed, (40, 30 + seed % 7), "JPEG", quality=90)


def manifest(path: Path, rows: dict[str, tuple[str, str]]) -> str:
    path.write_text("key,uri,labels\n" + "".join(f"{k},{uri},{labels}\n" for k, (uri, labels) in rows.items()))
    return str(path)


def dataset_bytes(folder: str) -> dict[str, bytes]:
    """The files a full rebuild and an incremental run must write identically."""
    names = [n for n in os.listdir(folder) if n.endswith(".tfrecord") or n in ("labels.txt",)
             or n.startswith("rejected-")]
    return {n: Path(folder, n).read_bytes() for n in sorted(names)}


def sources(folder: str) -> set[Source]:
    found = set()
    for name in os.listdir(folder):
        if name.startswith("sources-"):
            for line in Path(folder, name).read_text().splitlines():
                source = Source.from_json(line)
                found.add(source._replace(validators=tuple(sorted(source.validators.items()))))
    return found


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reuse")
    server = FaultServer().start()
    labels = ["cat", "dog", "cat|dog", "bird"]
    rows = {}
    for i in range(ROWS):
        # Half the images carry an ETag, half only a Last-Modified date: both kinds of validator.
        validator = {"etag": f'"v1-{i}"'} if i % 2 else {"last_modified": "Mon, 30 Nov 2026 02:00:00 GMT"}
        url = server.route(f"/img/{i}.jpg", Response(body=jpeg(i), content_type="image/jpeg", **validator))
        rows[f"k{i:02d}"] = (url, labels[i % 4])
    night1 = run(["--input", manifest(tmp / "night1.csv", rows), "--output", str(tmp / "night1"), *COMMON])
    night1_answers = len(server.answers)

    # Night 2: 3 rows gone, 3 relabelled, 3 new (10 %), and one image replaced on the server.
    for key in ("k00", "k01", "k02"):
        del rows[key]
    for key in ("k03", "k04", "k05"):
        rows[key] = (rows[key][0], "fish")
    for i in range(ROWS, ROWS + 3):
        rows[f"k{i:02d}"] = (server.route(f"/img/{i}.jpg", Response(body=jpeg(i), etag=f'"v1-{i}"')), "dog")
    server.route("/img/7.jpg", Response(body=jpeg(700), etag='"v2-7"'))
    night2 = manifest(tmp / "night2.csv", rows)

    out = {"night1": night1, "night1_answers": night1_answers, "tmp": tmp, "server": server}
    for name, extra in (("none", ["--reuse_dataset", str(tmp / "night1")]),
                        ("conditional", ["--reuse_dataset", str(tmp / "night1"), "--revalidate", "conditional"]),
                        ("full", [])):
        before = len(server.answers)
        out[name] = run(["--input", night2, "--output", str(tmp / name), *COMMON, *extra])
        answers = server.answers[before:]
        out[f"{name}_answers"] = {status: sum(1 for _, s in answers if s == status) for _, status in answers}
    yield out
    server.stop()


def test_a_reused_night_downloads_only_the_new_images(nights):
    assert nights["night1_answers"] == ROWS
    info = nights["none"]
    assert nights["none_answers"] == {200: 3}  # the three new rows, nothing else
    assert (info["rows_fetched"], info["rows_reused"], info["rows_revalidated"]) == (3, ROWS - 3, 0)
    assert info["reused_from"] == str(nights["tmp"] / "night1")
    assert info["input_rows"] == ROWS == info["rejected"] + sum(s["examples"] for s in info["splits"].values())


def test_revalidation_asks_every_source_and_downloads_only_what_changed(nights):
    info = nights["conditional"]
    # 26 unchanged images: 304; the replaced one and the 3 new ones: 200 with a body.
    assert nights["conditional_answers"] == {304: ROWS - 3 - 1, 200: 4}
    assert (info["rows_fetched"], info["rows_reused"], info["rows_revalidated"]) == (4, ROWS - 4, ROWS - 4)


def test_an_incremental_dataset_is_byte_for_byte_a_full_rebuild(nights):
    tmp = nights["tmp"]
    full, conditional = dataset_bytes(str(tmp / "full")), dataset_bytes(str(tmp / "conditional"))
    assert any(name.endswith(".tfrecord") for name in full) and full == conditional
    assert sources(str(tmp / "full")) == sources(str(tmp / "conditional"))
    assert nights["full"]["rows_reused"] == 0 and nights["full"]["rows_fetched"] == ROWS
    # Without revalidation the replaced image stays as stored: the one difference, by design.
    none = dataset_bytes(str(tmp / "none"))
    assert none.keys() == full.keys() and none != full
    drop = {"created", "rows_fetched", "rows_reused", "rows_revalidated", "reused_from", "options"}
    assert {k: v for k, v in nights["conditional"].items() if k not in drop} == \
        {k: v for k, v in nights["full"].items() if k not in drop}


def test_relabels_apply_and_removed_rows_are_gone(nights):
    info = nights["none"]
    examples = read_examples(str(nights["tmp"] / "none"), info)
    found = {id_: label_names(example, info) for id_, example in examples.items()}
    assert not {"k00", "k01", "k02"} & found.keys() and {f"k{i}" for i in range(ROWS, ROWS + 3)} <= found.keys()
    assert found["k03"] == found["k04"] == found["k05"] == {"fish"}
    assert found["k06"] == {"cat", "dog"}


def test_a_dataset_made_differently_is_not_reused(nights, caplog):
    tmp = nights["tmp"]
    before = len(nights["server"].answers)
    info = run(["--input", str(tmp / "night2.csv"), "--output", str(tmp / "bigger"), *COMMON, "--image_size", "40",
                "--reuse_dataset", str(tmp / "night1")])
    assert info["rows_reused"] == 0 and len(nights["server"].answers) - before == ROWS
    assert "not reusing" in caplog.text and "image fingerprint" in caplog.text
    # A download bound decides which sources are accepted: a run with another one rebuilds too.
    info = run(["--input", str(tmp / "night2.csv"), "--output", str(tmp / "bounded"), *COMMON,
                "--max_download_bytes", "1500", "--reuse_dataset", str(tmp / "night1")])
    assert info["rows_reused"] == 0 and info["rejected_by_reason"].get("fetch:too_large", 0) > 0
    with pytest.raises(Exception, match="is --output"):
        run(["--input", str(tmp / "night2.csv"), "--output", str(tmp / "night1"), *COMMON, "--overwrite",
             "--reuse_dataset", str(tmp / "night1")])
    assert json.loads((tmp / "night1" / "dataset.json").read_text())["input_rows"] == ROWS


def test_a_reused_row_the_earlier_shards_lost_is_recorded_not_lost(nights):
    import shutil

    import tensorflow as tf

    tmp = nights["tmp"]
    tampered = tmp / "tampered"
    shutil.copytree(tmp / "night1", tampered)
    info = json.loads((tampered / "dataset.json").read_text())
    shard = tampered / info["splits"]["train"]["files"][0]
    records = [r.numpy() for r in tf.data.TFRecordDataset(str(shard))]
    ids = [tf.train.Example.FromString(r).features.feature["id"].bytes_list.value[0].decode() for r in records]
    dropped = next(i for i in ids if i not in ("k00", "k01", "k02"))  # a row night 2 still has
    with tf.io.TFRecordWriter(str(shard)) as writer:  # what a dataset changed under a running job looks like
        for id_, record in zip(ids, records, strict=True):
            if id_ != dropped:
                writer.write(record)
    out = run(["--input", str(tmp / "night2.csv"), "--output", str(tmp / "after_tampering"), *COMMON,
               "--reuse_dataset", str(tampered)])
    assert out["rejected_by_reason"] == {"fetch:reuse_missing": 1} and out["rows_reused"] == ROWS - 4
    assert out["input_rows"] == out["rejected"] + sum(s["examples"] for s in out["splits"].values())
    assert dropped not in {s.id for s in sources(str(tmp / "after_tampering"))}
