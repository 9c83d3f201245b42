"""The embedded sample datasets must look exactly like the real Kaggle files to every consumer."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample_data
from sample_data import sources as sample_sources

OPTIONS = {"posters": 40, "heldout_posters": 16, "poster_size": (182, 268), "seed": 7, "chips": True}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "data"
    sample_data.build(out, **OPTIONS)
    return out


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("manifest, count", [("MovieGenre.csv", 40), ("MovieGenre-heldout.csv", 16)])
def test_poster_manifests_follow_movie_genre_format(built: Path, manifest: str, count: int) -> None:
    header, rows = _rows(built / "posters" / manifest)
    assert header == ["imdbId", "Imdb Link", "Title", "IMDB Score", "Genre", "Poster"]
    assert len(rows) == count
    for row in rows:
        assert row["imdbId"].isdigit()
        assert row["Imdb Link"] == f"http://www.imdb.com/title/tt{row['imdbId']}"
        assert 1.0 <= float(row["IMDB Score"]) <= 10.0
        genres = row["Genre"].split("|")
        assert 1 <= len(genres) <= 4 and len(set(genres)) == len(genres)
        assert set(genres) <= set(sample_sources.FASHION_MNIST_CLASSES)
        assert not Path(row["Poster"]).is_absolute()
        with Image.open(built / "posters" / row["Poster"]) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (182, 268))
    # Multi-label in a useful way: both single- and multi-genre posters occur.
    sizes = {len(row["Genre"].split("|")) for row in rows}
    assert 1 in sizes and max(sizes) >= 3


def test_labels_are_the_tiled_items_and_heldout_uses_only_the_test_split(built: Path) -> None:
    _, sources = _rows(built / "posters" / "sources.csv")
    by_id = {row["imdbId"]: row for row in sources}
    for manifest, split in (("MovieGenre.csv", "train"), ("MovieGenre-heldout.csv", "t10k")):
        _, labels = sample_sources.fashion_mnist(split)
        _, rows = _rows(built / "posters" / manifest)
        seen: list[int] = []
        for row in rows:
            source = by_id[row["imdbId"]]
            assert source["split"] == split
            indices = [int(i) for i in source["source_indices"].split()]
            seen += indices
            assert {sample_sources.FASHION_MNIST_CLASSES[labels[i]] for i in indices} == set(row["Genre"].split("|"))
        assert len(seen) == len(set(seen)), "a source item was tiled twice"
    ids = [row["imdbId"] for row in sources]
    assert len(ids) == len(set(ids)) == 56


def test_chips_follow_planet_format_and_are_real(built: Path) -> None:
    header, rows = _rows(built / "chips" / "train_v2.csv")
    assert header == ["image_name", "tags"]
    assert len(rows) >= 50
    for row in rows:
        tags = row["tags"].split(" ")
        assert tags and all(re.fullmatch(r"[a-z0-9_]+", tag) for tag in tags)
        with Image.open(built / "chips" / "train-jpg" / f"{row['image_name']}.jpg") as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (256, 256))
            assert np.asarray(image).std() > 1.0
    record = json.loads((built / sample_data.MARKER).read_text())
    assert record["counts"]["chips"] == len(rows)
    assert sum(record["label_counts"]["chips"].values()) == sum(len(r["tags"].split()) for r in rows)


def test_same_seed_gives_byte_identical_build(built: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    sample_data.build(again, **OPTIONS)
    assert _files(again) == _files(built)


def test_second_build_with_same_options_does_nothing(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = built / sample_data.MARKER
    before = marker.stat().st_mtime_ns
    sample_data.build(built, **OPTIONS)
    assert "nothing to do" in capsys.readouterr().out
    assert marker.stat().st_mtime_ns == before


def test_cli_rebuilds_in_place_when_options_change(tmp_path: Path) -> None:
    out = tmp_path / "small"
    assert sample_data.main(["--output", str(out), "--posters", "4", "--heldout_posters", "2",
                             "--poster_size", "100x150", "--no_chips"]) == 0
    assert not (out / "chips").exists()
    sample_data.main(["--output", str(out), "--posters", "6", "--heldout_posters", "2",
                      "--poster_size", "100x150", "--no_chips"])
    _, rows = _rows(out / "posters" / "MovieGenre.csv")
    assert len(rows) == 6
    with Image.open(out / "posters" / rows[0]["Poster"]) as image:
        assert image.size == (100, 150)
    assert [p.name for p in tmp_path.iterdir()] == ["small"], "a staging directory was left behind"


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not sample data")
    with pytest.raises(FileExistsError):
        sample_data.build(out, posters=2, heldout_posters=1, chips=False)
    assert (out / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
