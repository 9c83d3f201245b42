"""The Beam preprocessing job end to end: real runners, a real fault-injecting HTTP server, the GCS
emulator. Each pipeline run is a module-scoped fixture shared by several tests."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from pipelines import preprocess, shards
from pipelines.splits import split_of
from sample_data.hostile import png_header

from dataset_factory import label_names, read_examples
from fault_server import FaultServer, Response, redirect
from image_factory import noise_image
from job_runs import preprocess as run

IMAGE_SIZE = 32
# Small time-outs and one retry keep the fault run fast; 0.004 MiB shards force several shards.
FAST_FETCH = ["--allow_loopback", "--fetch_timeout_s", "0.5", "--fetch_retries", "1", "--fetch_backoff_s", "0.01",
              "--image_size", str(IMAGE_SIZE)]
TARGET_SHARD_MB = 0.004


def jpeg(seed: int, size: tuple[int, int] = (48, 36)) -> bytes:
    return noise_image(seed, size, "JPEG", quality=90)


def png_rgba(seed: int) -> bytes:
    return noise_image(seed, (50, 30), "PNG", mode="RGBA")


def read_rejected(folder: str, info: dict) -> dict[str, dict]:
    records = []
    for name in info["rejected_files"]:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            records += [json.loads(line) for line in f if line.strip()]
    return {f"{r['row']}:{r['id']}": r for r in records}


# --- the fault run: every kind of bad row, served by a real HTTP server -----------------------------

MOVIE_HEADER = b"imdbId,Imdb Link,Title,IMDB Score,Genre,Poster\n"
GOOD_GENRES = ["Drama|Comedy", "Comedy", "Action|Drama", "Drama", "Action", "Comedy|Action", "Drama|Rare",
               "Action|Comedy|Drama", "Comedy", "Drama"]
# row -> (stage, reason) expected in the dead letter
EXPECTED_REJECTED = {
    11: ("fetch", "http_404"), 13: ("fetch", "timeout"), 14: ("decode", "truncated"), 15: ("fetch", "truncated"),
    16: ("decode", "not_an_image"), 17: ("decode", "too_many_pixels"), 18: ("fetch", "too_large"),
    19: ("fetch", "blocked_address"), 20: ("parse", "missing_uri"), 21: ("duplicate", "duplicate_id"),
    22: ("labels", "no_known_label"),
    5: ("labels", "no_known_label"),  # "Action" only: the third most frequent genre, cut by --max_labels 2
}


def movie_row(imdb_id: str, title: bytes, genres: str, poster: str) -> bytes:
    return b",".join([imdb_id.encode(), f"http://www.imdb.com/title/tt{imdb_id}".encode(), title, b"7.1",
                      genres.encode(), f'"{poster}"'.encode() if poster else b""]) + b"\n"


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    server = FaultServer().start()
    tmp = tmp_path_factory.mktemp("fault")
    good = {f"{100000 + i}": server.serve(f"/p/{i}.jpg", jpeg(i, (40 + 7 * i, 60))) for i in range(1, 10)}
    good["100010"] = server.serve("/p/10.png", png_rgba(10), "image/png")
    whole = jpeg(99, (300, 200))
    bad = {
        11: server.route("/404.jpg", Response(status=404)),
        12: server.route("/flaky.jpg", [Response(status=500), Response(body=jpeg(12), content_type="image/jpeg")]),
        13: server.route("/slow.jpg", Response(body=jpeg(13), delay_s=2.0)),
        14: server.serve("/cut.jpg", whole[: len(whole) // 2]),
        15: server.route("/short.jpg", Response(body=whole[:100], declared_length=len(whole))),
        16: server.serve("/html.jpg", b"<html><body>Poster not found</body></html>", "text/html"),
        17: server.serve("/bomb.png", png_header(30000, 30000), "image/png"),
        18: server.route("/huge.jpg", Response(body=b"\xff\xd8", stream_extra_bytes=3_000_000)),
        19: server.route("/meta.jpg", redirect("http://169.254.169.254/computeMetadata/v1/")),
    }
    lines = [MOVIE_HEADER]
    for i, (imdb_id, url) in enumerate(good.items()):
        lines.append(movie_row(imdb_id, f"Good {i} (1999)".encode(), GOOD_GENRES[i], url))
    for row in range(11, 20):
        lines.append(movie_row(str(200000 + row), b'"Bad, Row (2001)"', "Drama", bad[row]))
    lines.append(movie_row("200020", b"No Poster (1995)", "Drama", ""))
    lines.append(movie_row("100001", b"Duplicate (1995)", "Comedy", good["100001"]))
    lines.append(movie_row("200022", b"Only Rare Genre (1970)", "Western", server.serve("/w.jpg", jpeg(22))))
    lines.append(movie_row("200023", b"Les Mis\xe9rables (1995)", "Drama|Romance", server.serve("/lm.jpg", jpeg(23))))
    manifest = tmp / "MovieGenre.csv"
    manifest.write_bytes(b"".join(lines))
    output = str(tmp / "out")
    info = run(["--input", str(manifest), "--output", output, "--min_label_count", "2", "--max_labels", "2",
                "--max_download_bytes",
                "1000000", "--target_shard_mb", str(TARGET_SHARD_MB), "--val_fraction", "0.2", "--test_fraction",
                "0.2", *FAST_FETCH])
    yield {"info": info, "output": output, "server": server, "manifest": str(manifest)}
    server.stop()


def test_fault_run_writes_good_rows_with_labels_and_images(fault_run):
    info, output = fault_run["info"], fault_run["output"]
    examples = read_examples(output, info)
    expected_ids = {f"{100000 + i}" for i in range(1, 11)} - {"100005"} | {"200012", "200023"}
    assert set(examples) == expected_ids
    # By frequency (TFT's order); Action (4 rows) is cut by --max_labels 2, and Rare, Western and
    # Romance (1 row each) by --min_label_count 2.
    assert info["labels"] == ["Drama", "Comedy"]
    assert Path(output, "labels.txt").read_text().splitlines() == info["labels"]
    for i, genres in enumerate(GOOD_GENRES):
        if f"{100001 + i}" in examples:
            assert label_names(examples[f"{100001 + i}"], info) == set(genres.split("|")) - {"Rare", "Action"}
    assert label_names(examples["200023"], info) == {"Drama"}
    for example in examples.values():
        image = tf.io.decode_jpeg(example["image"])
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert fault_run["server"].hits("/flaky.jpg") == 2  # the 500 was retried and recovered
    assert info["image_size"] == IMAGE_SIZE and info["resize_policy"] == "squash"
    assert info["options"]["format"] == "movie_genre"


def test_fault_run_dead_letter_has_each_bad_row_with_stage_and_reason(fault_run):
    info, output = fault_run["info"], fault_run["output"]
    rejected = read_rejected(output, info)
    got = {r["row"]: (r["stage"], r["reason"]) for r in rejected.values()}
    assert got == EXPECTED_REJECTED
    duplicate = next(r for r in rejected.values() if r["stage"] == "duplicate")
    assert duplicate["id"] == "100001" and "row 1 of" in duplicate["detail"]
    blocked = next(r for r in rejected.values() if r["reason"] == "blocked_address")
    assert "169.254.169.254" in blocked["detail"]
    assert all(r["file"] == fault_run["manifest"] for r in rejected.values())
    expected_by_reason: dict[str, int] = {}
    for stage, reason in EXPECTED_REJECTED.values():
        expected_by_reason[f"{stage}:{reason}"] = expected_by_reason.get(f"{stage}:{reason}", 0) + 1
    assert info["rejected_by_reason"] == expected_by_reason


def test_fault_run_accounts_for_every_row(fault_run):
    info = fault_run["info"]
    examples = sum(s["examples"] for s in info["splits"].values())
    assert info["input_rows"] == 23
    assert (examples, info["rejected"]) == (11, 12)
    assert info["input_rows"] == examples + info["rejected"]
    on_disk = json.loads(Path(fault_run["output"], "dataset.json").read_text())
    assert on_disk == info


def test_shard_count_follows_estimated_size_and_every_example_is_in_one_shard(fault_run):
    info, output = fault_run["info"], fault_run["output"]
    examples = read_examples(output, info)  # also asserts no id is in two shards
    target = int(TARGET_SHARD_MB * 2**20)
    # The 21 parsed, de-duplicated rows are fewer than shards.SAMPLE_ROWS, so all are in the size sample:
    # bytes per row = all example bytes / those rows (a rejected one counts 0), times each split's rows.
    kept = list(examples) + [r["id"] for r in read_rejected(output, info).values()
                             if r["stage"] in ("labels", "fetch", "decode")]
    assert len(kept) == 21 < shards.SAMPLE_ROWS
    per_row = sum(e["bytes"] for e in examples.values()) / len(kept)
    for split, summary in info["splits"].items():
        mine = [e for e in examples.values() if e["split"] == split]
        assert summary["examples"] == len(mine)
        rows = sum(split_of(id_, 0.2, 0.2) == split for id_ in kept)
        expected = max(1, math.ceil(rows * per_row / target)) if rows else 0
        assert summary["shards"] == expected
        assert summary["files"] == [f"{split}-{i:05d}-of-{expected:05d}.tfrecord" for i in range(expected)]
        assert summary["bytes"] == sum(os.path.getsize(os.path.join(output, f)) for f in summary["files"])
        counts = {label: sum(label in label_names(e, info) for e in mine) for label in info["labels"]}
        assert summary["label_counts"] == counts
    assert info["splits"]["train"]["shards"] >= 2
    leftovers = [n for n in os.listdir(output) if ".tmp-" in n]
    assert leftovers == []


def test_transform_output_maps_raw_labels_like_labels_txt(fault_run):
    import tensorflow_transform as tft

    info = fault_run["info"]
    layer = tft.TFTransformOutput(os.path.join(fault_run["output"], "transform_output")).transform_features_layer()
    ids = layer({"labels": tf.sparse.from_dense(tf.constant([["Comedy", "Western", "Drama"]]))})["label_ids"]
    assert tf.sparse.to_dense(ids).numpy().tolist() == [[info["labels"].index("Comedy"), -1,
                                                         info["labels"].index("Drama")]]


def test_existing_output_is_refused_without_overwrite(fault_run, capsys):
    before = sorted(os.listdir(fault_run["output"]))
    code = preprocess.main(["--input", fault_run["manifest"], "--output", fault_run["output"]])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --output") and "--overwrite" in err and err.count("\n") == 1
    assert sorted(os.listdir(fault_run["output"])) == before


def test_a_folder_of_the_users_own_files_is_never_cleared(fault_run, tmp_path, capsys):
    # Files whose names look like the job's own, in a folder no tagbeam job wrote: refused, all kept.
    mine = tmp_path / "mine"
    (mine / "transform_output").mkdir(parents=True)
    files = {"rejected-notes.jsonl": "a", "draft.tmp-1": "b", "labels.txt": "c", "transform_output/mine.txt": "d"}
    for name, text in files.items():
        (mine / name).write_text(text)
    assert preprocess.main(["--input", fault_run["manifest"], "--output", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output {mine} holds files no tagbeam job wrote") and err.count("\n") == 1
    assert {name: (mine / name).read_text() for name in files} == files
    assert not (mine / ".tagbeam-output").exists()
    # A file, or a place that cannot be written: one error line, nothing written.
    assert preprocess.main(["--input", fault_run["manifest"], "--output", str(mine / "labels.txt")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert preprocess.main(["--input", fault_run["manifest"], "--output", "/proc/tagbeam-out"]) == 2
    assert "cannot be written" in capsys.readouterr().err


# --- local runs: reruns, the multi-process runner, a grown manifest -----------------------------------

def write_generic_manifest(folder: Path, count: int) -> Path:
    (folder / "img").mkdir(exist_ok=True)
    lines = ["key,uri,labels"]
    for i in range(count):
        name = f"img/{i:03d}.jpg"
        if not (folder / name).exists():
            (folder / name).write_bytes(jpeg(1000 + i, (30 + i % 17, 25 + i % 11)))
        labels = "|".join(label for j, label in enumerate("abcd") if (i >> j) & 1) or "a"
        lines.append(f"item-{i:03d},{name},{labels}")
    path = folder / f"manifest-{count}.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    base, grown = write_generic_manifest(tmp, 40), write_generic_manifest(tmp, 48)
    common = ["--id_column", "key", "--val_fraction", "0.3", "--test_fraction", "0", *FAST_FETCH]
    first = str(tmp / "first")
    runs = {"first": run(["--input", str(base), "--output", first, *common])}
    runs["first_examples"] = read_examples(first, runs["first"])
    runs["first_files"] = sorted(os.listdir(first))
    multi = str(tmp / "multi")
    runs["multi"] = run(["--input", str(base), "--output", multi, *common,
                         "--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    runs["multi_examples"] = read_examples(multi, runs["multi"])
    # The grown manifest replaces the first dataset: --overwrite deletes the old files first.
    runs["grown"] = run(["--input", str(grown), "--output", first, "--overwrite", *common])
    runs["grown_examples"] = read_examples(first, runs["grown"])
    runs["grown_files"] = sorted(os.listdir(first))
    runs["base_manifest"], runs["first_output"] = str(base), first
    return runs


def test_multi_process_runner_writes_the_same_examples_as_the_default(local_runs):
    first, multi = local_runs["first_examples"], local_runs["multi_examples"]
    assert len(first) == 40
    def strip(examples: dict) -> dict:
        return {k: (v["split"], v["labels"], v["image"]) for k, v in examples.items()}

    assert strip(multi) == strip(first)  # same input twice: same split membership, labels and bytes
    assert local_runs["multi"]["labels"] == local_runs["first"]["labels"]


def test_grown_manifest_keeps_every_earlier_row_in_its_split(local_runs):
    first, grown = local_runs["first_examples"], local_runs["grown_examples"]
    assert len(grown) == 48 and set(first) < set(grown)
    assert {k: grown[k]["split"] for k in first} == {k: v["split"] for k, v in first.items()}
    assert {v["split"] for v in grown.values()} == {"train", "val"}


def test_empty_split_gets_no_shards_and_overwrite_replaces_old_files(local_runs):
    info = local_runs["grown"]
    assert info["splits"]["test"] == {"examples": 0, "shards": 0, "files": [], "bytes": 0,
                                      "label_counts": {label: 0 for label in info["labels"]}}
    expected = {".tagbeam-output", "dataset.json", "labels.txt", "transform_output", *info["rejected_files"],
                "sources-00000-of-00001.jsonl",
                *info["splits"]["train"]["files"], *info["splits"]["val"]["files"]}
    assert set(local_runs["grown_files"]) == expected
    assert info["rejected"] == 0 and info["rejected_files"] == ["rejected-00000-of-00001.jsonl"]
    assert Path(local_runs["first_output"], "rejected-00000-of-00001.jsonl").read_text() == ""


# --- gs:// in and out, against the GCS emulator -----------------------------------------------------

def test_gcs_input_and_output_on_the_emulator(gcs_bucket, emulator_credentials, tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = storage.Client(project="test-project", credentials=AnonymousCredentials()).bucket(gcs_bucket)
    tags = ["haze primary", "clear primary water", "agriculture clear", "primary", "cloudy", "haze"]
    rows = ["image_name,tags"] + [f"train_{i},{t}" for i, t in enumerate(tags)]
    bucket.blob("planet/train_v2.csv").upload_from_string("\n".join(rows) + "\n")
    for i in range(len(tags) - 1):  # train_5 has no image: fetch/not_found
        bucket.blob(f"planet/train-jpg/train_{i}.jpg").upload_from_string(jpeg(i, (64, 64)))

    # A production model's label order, which the run must keep; "agriculture" and "cloudy" are
    # not in it, so train_4 ("cloudy") has no known label and is kept all-zero (--unlabeled keep).
    vocab = tmp_path / "labels.txt"
    vocab.write_text("water\nprimary\n\nhaze \nclear\n")
    output = f"gs://{gcs_bucket}/out"
    # What a killed run leaves: its marker (written first) and an orphaned run file.
    bucket.blob("out/.tagbeam-output").upload_from_string(b'{"written_by": "pipelines.preprocess"}')
    bucket.blob("out/runs.tmp-killed/train-00000-x.run").upload_from_string(b"an orphan of a killed run")
    info = run(["--input", f"gs://{gcs_bucket}/planet/train_v2.csv", "--output", output, "--vocab_file", str(vocab),
                "--unlabeled", "keep", "--shard_compression", "gzip", *FAST_FETCH])

    assert info["options"]["format"] == "planet" and info["shard_compression"] == "gzip"
    assert info["labels"] == ["water", "primary", "haze", "clear"]
    names = {b.name for b in bucket.list_blobs(prefix="out/")}
    assert "out/dataset.json" in names and "out/labels.txt" in names
    assert "out/transform_output/transform_fn/saved_model.pb" in names
    assert [n for n in names if ".tmp-" in n] == []  # run files, this run's and an orphan, are gone
    assert json.loads(bucket.blob("out/dataset.json").download_as_bytes()) == info
    assert bucket.blob("out/labels.txt").download_as_text().splitlines() == info["labels"]
    for name in names - {"out/dataset.json"}:
        if name.endswith((".tfrecord.gz", ".jsonl")):
            bucket.blob(name).download_to_filename(str(tmp_path / os.path.basename(name)))
    examples = read_examples(str(tmp_path), info)
    assert set(examples) == {f"train_{i}" for i in range(5)}
    assert label_names(examples["train_1"], info) == {"clear", "primary", "water"}
    assert label_names(examples["train_2"], info) == {"clear"}
    assert examples["train_4"]["labels"] == (0, 0, 0, 0)
    rejected = list(read_rejected(str(tmp_path), info).values())
    assert [(r["id"], r["stage"], r["reason"]) for r in rejected] == [("train_5", "fetch", "not_found")]
    assert rejected[0]["uri"] == f"gs://{gcs_bucket}/planet/train-jpg/train_5.jpg"

    # Incremental from gs:// to gs://: a replaced object has a new generation and is fetched again.
    bucket.blob("planet/train-jpg/train_1.jpg").upload_from_string(jpeg(101, (64, 64)))
    again = run(["--input", f"gs://{gcs_bucket}/planet/train_v2.csv", "--output", f"gs://{gcs_bucket}/out2",
                 "--vocab_file", str(vocab), "--unlabeled", "keep", "--shard_compression", "gzip", *FAST_FETCH,
                 "--reuse_dataset", output, "--revalidate", "conditional"])
    assert (again["rows_reused"], again["rows_revalidated"], again["rows_fetched"]) == (4, 4, 2)
    assert again["reused_from"] == output and again["input_rows"] == info["input_rows"]
    second = tmp_path / "second"
    second.mkdir()
    for blob in bucket.list_blobs(prefix="out2/"):
        if blob.name.endswith(".tfrecord.gz"):
            blob.download_to_filename(str(second / os.path.basename(blob.name)))
    renewed = read_examples(str(second), again)
    assert {k for k in examples if renewed[k]["image"] != examples[k]["image"]} == {"train_1"}


# --- user errors: one line, exit code 2 ----------------------------------------------------------------

def error_of(argv: list[str], capsys) -> str:
    code = preprocess.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    out = str(tmp_path / "out")
    err = error_of(["--input", str(tmp_path / "missing.csv"), "--output", out], capsys)
    assert err.startswith("error: --input") and "no such file" in err and err.count("\n") == 1

    err = error_of(["--input", "x.csv", "--output", out, "--format", "imagenet"], capsys)
    assert err.startswith("error: argument --format: invalid choice: 'imagenet'") and err.count("\n") == 1

    columns = tmp_path / "columns.csv"
    columns.write_text("path,tags\na.jpg,x\n")
    err = error_of(["--input", str(columns), "--output", out], capsys)
    assert "missing column(s) uri, labels" in err and "found ['path', 'tags']" in err and err.count("\n") == 1

    empty = tmp_path / "empty.csv"
    empty.write_text("imdbId,Imdb Link,Title,IMDB Score,Genre,Poster\n")
    err = error_of(["--input", str(empty), "--output", out], capsys)
    assert "no data rows" in err and err.count("\n") == 1
    assert not os.path.exists(out)


def test_no_label_surviving_min_label_count_is_a_user_error(tmp_path, capsys):
    manifest = write_generic_manifest(tmp_path, 6)
    err = error_of(["--input", str(manifest), "--output", str(tmp_path / "out"), "--min_label_count", "50"], capsys)
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: no label is used by at least --min_label_count 50 rows")
    assert "a (" in last and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out" / "dataset.json")


def test_command_line_help_and_exit_code():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--help"], capture_output=True, text=True,
                          check=False, env=env, timeout=120)
    assert done.returncode == 0
    for flag in ("--min_label_count", "--target_shard_mb", "--resize_policy", "--allow_link_local", "--unlabeled"):
        assert flag in done.stdout
    done = subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--input", "/nonexistent/m.csv",
                           "--output", "/tmp/never-written"], capture_output=True, text=True, check=False, env=env,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --input /nonexistent/m.csv: no such file")


def test_lost_rows_fail_the_commit_with_the_numbers():
    from pipelines import dataset_info
    from tagbeam.stored import StoredImages

    shard = {"split": "train", "index": 0, "num_shards": 1, "file": "train-00000-of-00001.tfrecord",
             "examples": 7, "bytes": 100, "label_counts": [7]}
    options = {"image_size": 32}  # the flags' record only: what is stored comes from the layout
    layout = dataset_info.Layout(StoredImages(32, "jpeg", "squash", 95, "4:2:0"), "none", "reject")
    info = dataset_info.build_info(labels=["a"], input_rows=9, rejected_by_reason={"fetch:http_404": 2},
                                   shards=[shard], rejected_files=["/x/rejected-00000-of-00001.jsonl"], layout=layout,
                                   options=options)
    assert info.splits["train"].examples == 7 and info.splits["val"].shards == 0
    with pytest.raises(dataset_info.InvariantError, match=r"input_rows 10 != examples 7 \+ rejected 2"):
        dataset_info.build_info(labels=["a"], input_rows=10, rejected_by_reason={"fetch:http_404": 2},
                                shards=[shard], rejected_files=[], layout=layout, options=options)
