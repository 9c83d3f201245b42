"""Manifest parsing: every input format from small fixtures in its exact real layout, no Beam run."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import manifests
from pipelines.manifests import ManifestOptions, ManifestSpec, Row
from tagbeam import flags
from tagbeam.dataset import Rejection
from tagbeam.flags import UsageError

AMAZON = "https://images-na.ssl-images-amazon.com/images/M/"
# Kaggle's MovieGenre.csv, byte for byte in its style: poster URLs hold commas and are quoted,
# titles with commas are quoted, titles are Latin-1 (not UTF-8), a poster may be missing.
MOVIE_GENRE = (
    b"imdbId,Imdb Link,Title,IMDB Score,Genre,Poster\r\n"
    b"114709,http://www.imdb.com/title/tt114709,Toy Story (1995),8.3,Animation|Adventure|Comedy,"
    b'"' + AMAZON.encode() + b"MV5BMDU2ZWJlMjktMTRhMy00ZTA5LWEzNDgtYmNmZTEwZTViZWJkXkEyXkFqcGdeQXVyNDQ2OTk4MzI@"
    b'._V1_UX182_CR0,0,182,268_AL_.jpg"\r\n'
    b"114576,http://www.imdb.com/title/tt114576,Les Mis\xe9rables (1995),7.2,Drama|Romance| Drama ,"
    b'"' + AMAZON.encode() + b'MV5BMTU4NDM0NjA1OF5BMl5BanBnXkFtZTcwMjU1NjcxMQ@@._V1_UX182_CR0,0,182,268_AL_.jpg"\r\n'
    b'112682,http://www.imdb.com/title/tt112682,"City of Lost Children, The (1995)",7.7,Adventure|Drama|Fantasy,'
    b'"' + AMAZON.encode() + b'MV5BNjM4ODI5NTQ4OV5BMl5BanBnXkFtZTcwNzE4NTcxNA@@._V1_UX182_CR0,0,182,268_AL_.jpg"\r\n'
    b"113189,http://www.imdb.com/title/tt113189,Nueba Yol (1995),6.7,Comedy|Drama,\r\n"
    # A UTF-8 title and a CP1252 curly quote in the same file: the encoding is decided per line.
    b"2380307,http://www.imdb.com/title/tt2380307,Pok\xc3\xa9mon (2014),7.0,Animation,posters/tt2380307.jpg\r\n"
    b'95016,http://www.imdb.com/title/tt95016,"Die Hard \x92Special\x92\nEdition (1988)",8.2,Action|Thriller,'
    b"posters/tt95016.jpg\r\n"
    b"\r\n"
)


def write(path, data: bytes | str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return str(path)


def parse(spec: ManifestSpec, path: str) -> list:
    with open(path, "rb") as handle:
        return list(manifests.parse_table(spec, path, handle))


def test_movie_genre_rows_encodings_quotes_and_missing_poster(tmp_path):
    path = write(tmp_path / "MovieGenre.csv", MOVIE_GENRE)
    assert manifests.detect_format(path) == "movie_genre"
    spec = manifests.resolve_spec(ManifestOptions(input=path))
    assert spec.format == "movie_genre" and spec.files == (path,)
    results = parse(spec, path)
    assert len(results) == 6  # the blank last line is not a row
    rows = [r for r in results if isinstance(r, Row)]
    rejected = [r for r in results if not isinstance(r, Row)]

    assert [r.id for r in rows] == ["114709", "114576", "112682", "2380307", "95016"]
    assert [r.row for r in rows] == [1, 2, 3, 5, 6]
    toy, les_mis, city, pokemon, die_hard = rows
    assert toy.labels == ("Animation", "Adventure", "Comedy")
    assert toy.uri.endswith("_V1_UX182_CR0,0,182,268_AL_.jpg")  # quoted commas stay in the URL
    assert les_mis.labels == ("Drama", "Romance")  # stripped and de-duplicated, order kept
    assert city.labels == ("Adventure", "Drama", "Fantasy")
    assert pokemon.uri == os.path.join(str(tmp_path), "posters", "tt2380307.jpg")  # relative -> manifest folder
    assert pokemon.base == str(tmp_path)
    assert die_hard.labels == ("Action", "Thriller")  # after a quoted newline in the title

    assert rejected == [Rejection(file=path, row=4, id="113189", uri="", stage="parse", reason="missing_uri",
                                  detail=f"row 4 of {path} has no image URI")]


def test_lines_decode_as_utf8_then_cp1252_then_latin1():
    assert manifests.decode_line(b"Pok\xc3\xa9mon") == ("Pokémon", "utf-8")
    assert manifests.decode_line(b"Les Mis\xe9rables") == ("Les Misérables", "cp1252")
    assert manifests.decode_line(b"\x92quoted\x92") == ("\u2019quoted\u2019", "cp1252")
    assert manifests.decode_line(b"undefined in cp1252: \x81") == ("undefined in cp1252: \x81", "latin-1")


def test_planet_rows_use_the_image_root_and_extension(tmp_path):
    path = write(tmp_path / "train_v2.csv",
                 "image_name,tags\ntrain_0,haze primary\ntrain_1,agriculture clear primary water\ntrain_2,\n")
    os.makedirs(tmp_path / "train-jpg")
    assert manifests.detect_format(path) == "planet"
    spec = manifests.resolve_spec(ManifestOptions(input=path))
    assert spec.image_root == str(tmp_path / "train-jpg")
    rows = parse(spec, path)
    assert rows[0] == Row(path, 1, "train_0", str(tmp_path / "train-jpg" / "train_0.jpg"), str(tmp_path / "train-jpg"),
                          ("haze", "primary"))
    assert rows[1].labels == ("agriculture", "clear", "primary", "water")
    assert rows[2].labels == () and rows[2].id == "train_2"  # no tags: decided later (--unlabeled)

    tif = manifests.resolve_spec(ManifestOptions(input=path, format="planet", image_ext="tif",
                                                 image_root="https://example.org/train-tif-v2"))
    assert parse(tif, path)[0].uri == "https://example.org/train-tif-v2/train_0.tif"


def test_planet_names_and_voc_ids_are_names_not_paths_or_urls(tmp_path):
    path = write(tmp_path / "train_v2.csv", "image_name,tags\nhttp://169.254.169.254/latest,haze\n"
                                            "../../etc/passwd,clear\nC:evil,haze\nok_1,haze\n")
    os.makedirs(tmp_path / "train-jpg")
    rows = parse(manifests.resolve_spec(ManifestOptions(input=path)), path)
    assert [(r.stage, r.reason) for r in rows[:3]] == [("parse", "bad_image_name")] * 3
    assert rows[3].uri == str(tmp_path / "train-jpg" / "ok_1.jpg")

    root = make_voc(tmp_path / "VOC2012")
    outside = write(tmp_path / "elsewhere" / "evil.xml", VOC_XML.format(id="evil", objects=voc_object("cat")))
    assert os.path.exists(outside)
    write(tmp_path / "VOC2012" / "ImageSets" / "Main" / "evil.txt", "../../elsewhere/evil\n2008_000008\n")
    spec = manifests.resolve_spec(ManifestOptions(input=root, format="voc", voc_image_set="evil"))
    source, ids = manifests.voc_ids(spec)
    traversal, horse = (manifests.voc_row(spec, source, i + 1, image_id) for i, image_id in enumerate(ids))
    assert (traversal.stage, traversal.reason) == ("parse", "bad_id") and horse.labels == ("horse", "person")


def test_a_label_with_a_line_break_is_its_rows_rejection(tmp_path):
    # labels.txt holds one label per line: such a label would publish a dataset whose labels.txt
    # disagrees with dataset.json.
    path = write(tmp_path / "m.jsonl", '{"uri": "a.jpg", "labels": ["cat", "two\\nlines"]}\n'
                                       '{"uri": "b.jpg", "labels": ["cat", "do\\u2028g"]}\n{"uri": "c.jpg", "labels": ["cat"]}\n')
    bad, separator, good = parse(manifests.resolve_spec(ManifestOptions(input=path)), path)
    assert (bad.stage, bad.reason) == ("parse", "bad_label") and "line break" in bad.detail
    assert separator.reason == "bad_label" and good.labels == ("cat",)


def test_planet_without_image_folder_says_which_flag(tmp_path):
    path = write(tmp_path / "train_v2.csv", "image_name,tags\ntrain_0,haze\n")
    with pytest.raises(UsageError, match=r"train-jpg .*--image_root"):
        manifests.resolve_spec(ManifestOptions(input=path))


VOC_XML = """<annotation>
  <folder>VOC2012</folder><filename>{id}.jpg</filename>
  <size><width>500</width><height>375</height><depth>3</depth></size>
  {objects}
</annotation>"""


def voc_object(name: str) -> str:
    return (f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>0</difficult>"
            "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>")


def make_voc(root) -> str:
    write(root / "Annotations" / "2008_000008.xml",
          VOC_XML.format(id="2008_000008", objects=voc_object("horse") + voc_object("person") + voc_object("person")))
    write(root / "Annotations" / "2008_000015.xml", VOC_XML.format(id="2008_000015", objects=voc_object("bottle")))
    write(root / "Annotations" / "2008_000019.xml", VOC_XML.format(id="2008_000019", objects=voc_object("dog")))
    bomb = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
            "<annotation><filename>&lol2;</filename></annotation>")
    write(root / "Annotations" / "2008_000023.xml", bomb)
    write(root / "ImageSets" / "Main" / "train.txt", "2008_000008\n2008_000023\n2008_000099\n")
    write(root / "ImageSets" / "Main" / "val.txt", "2008_000015\n2008_000019\n")
    return str(root)


def test_voc_objects_image_sets_and_refused_doctype(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    spec = manifests.resolve_spec(ManifestOptions(input=root))
    assert spec.format == "voc"
    source, ids = manifests.voc_ids(spec)
    assert ids == ["2008_000008", "2008_000015", "2008_000019", "2008_000023"]

    train = manifests.resolve_spec(ManifestOptions(input=root, format="voc", voc_image_set="train"))
    source, ids = manifests.voc_ids(train)
    assert source.endswith("ImageSets/Main/train.txt") and ids == ["2008_000008", "2008_000023", "2008_000099"]
    horse, bomb, missing = (manifests.voc_row(train, source, i + 1, image_id) for i, image_id in enumerate(ids))
    assert horse == Row(source, 1, "2008_000008", os.path.join(root, "JPEGImages", "2008_000008.jpg"), root,
                        ("horse", "person"))
    assert (bomb.stage, bomb.reason, bomb.row) == ("parse", "bad_xml", 2)
    assert "DOCTYPE" in bomb.detail
    assert (missing.reason, missing.id) == ("missing_annotation", "2008_000099")

    with pytest.raises(UsageError, match="--voc_image_set test"):
        manifests.resolve_spec(ManifestOptions(input=root, format="voc", voc_image_set="test"))


def test_generic_csv_jsonl_and_parquet(tmp_path):
    csv_path = write(tmp_path / "m.csv",
                     'key,uri,labels\nk1,img/a.jpg,cat|dog\nk2,https://x.org/b.png,"dog| |cat|dog"\nk3,,cat\n')
    jsonl_path = write(tmp_path / "m.jsonl", "\n".join(json.dumps(r) for r in (
        {"uri": "img/a.jpg", "labels": ["cat", "dog", "cat"]},
        {"uri": "gs://bucket/b.jpg", "labels": "dog|bird"},
        {"uri": "../escape.jpg", "labels": []},
    )) + "\n\nnot json\n")
    parquet_path = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"uri": ["img/a.jpg", "img/b.jpg"], "labels": [["cat"], ["dog", " bird "]]}), parquet_path)

    for path in (csv_path, jsonl_path, parquet_path):
        assert manifests.detect_format(path) == "generic"

    csv_rows = parse(manifests.resolve_spec(ManifestOptions(input=csv_path, id_column="key")), csv_path)
    assert csv_rows[0] == Row(csv_path, 1, "k1", str(tmp_path / "img" / "a.jpg"), str(tmp_path), ("cat", "dog"))
    assert csv_rows[1].uri == "https://x.org/b.png" and csv_rows[1].labels == ("dog", "cat")
    assert csv_rows[2].reason == "missing_uri" and csv_rows[2].id == "k3"

    jsonl_rows = parse(manifests.resolve_spec(ManifestOptions(input=jsonl_path)), jsonl_path)
    assert jsonl_rows[0].id == "img/a.jpg"  # default id: the URI as written, stable across machines
    assert jsonl_rows[0].labels == ("cat", "dog")
    assert jsonl_rows[1].labels == ("dog", "bird") and jsonl_rows[1].uri == "gs://bucket/b.jpg"
    assert (jsonl_rows[2].reason, jsonl_rows[2].row) == ("escapes_base", 3)
    assert (jsonl_rows[3].reason, jsonl_rows[3].row) == ("malformed_row", 4)

    parquet_rows = parse(manifests.resolve_spec(ManifestOptions(input=parquet_path)), parquet_path)
    assert [(r.row, r.id, r.labels) for r in parquet_rows] == [(1, "img/a.jpg", ("cat",)),
                                                               (2, "img/b.jpg", ("dog", "bird"))]


def test_user_errors_name_the_file_and_what_to_do(tmp_path):
    with pytest.raises(UsageError, match=r"--input .*nope\.csv: no such file"):
        manifests.resolve_spec(ManifestOptions(input=str(tmp_path / "nope.csv")))
    wrong = write(tmp_path / "wrong.csv", "path,tags\na.jpg,x\n")
    with pytest.raises(UsageError, match=r"missing column\(s\) uri, labels .*found \['path', 'tags'\].*--uri_column"):
        manifests.resolve_spec(ManifestOptions(input=wrong))
    header_only = write(tmp_path / "empty.csv", "imdbId,Imdb Link,Title,IMDB Score,Genre,Poster\n")
    with pytest.raises(UsageError, match="no data rows"):
        manifests.resolve_spec(ManifestOptions(input=header_only))
    with pytest.raises(UsageError, match="is empty"):
        manifests.resolve_spec(ManifestOptions(input=write(tmp_path / "zero.csv", b"")))
    with pytest.raises(UsageError, match="folder without Annotations"):
        manifests.resolve_spec(ManifestOptions(input=str(tmp_path)))


def test_an_unreadable_manifest_is_one_clear_error_before_any_work(tmp_path):
    import gzip

    corrupt = tmp_path / "m.csv.gz"
    corrupt.write_bytes(gzip.compress(b"uri,labels\na.jpg,cat\n")[:12] + b"\x00garbage")
    not_parquet = write(tmp_path / "m.parquet", "uri,labels\na.jpg,cat\n")
    huge_header = write(tmp_path / "big.csv", "uri," + "x" * 200_000 + "\na.jpg,cat\n")
    for path in (str(corrupt), not_parquet, huge_header):
        with pytest.raises(UsageError, match=r"--input .*: cannot read it as a (csv|parquet) manifest"):
            manifests.resolve_spec(ManifestOptions(input=path))


def test_a_file_that_breaks_mid_way_is_recorded_not_a_crash(tmp_path):
    import apache_beam as beam
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.testing.util import assert_that, equal_to

    # Its footer (what resolve_spec reads) is intact; a data page in the middle is not.
    table = pa.table({"uri": [f"{os.urandom(8).hex()}.jpg" for _ in range(20_000)], "labels": ["cat"] * 20_000})
    path = tmp_path / "m.parquet"
    pq.write_table(table, path, row_group_size=5000, compression="snappy")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(b ^ 0x5A for b in data[middle:middle + 200])
    path.write_bytes(bytes(data))
    spec = manifests.resolve_spec(ManifestOptions(input=str(path)))
    with beam.Pipeline("FnApiRunner") as p:
        parsed = p | manifests.ReadManifest(spec)
        records = parsed.rejected | beam.Map(lambda r: (r.stage, r.reason, "could not be read" in r.detail))
        assert_that(records, equal_to([("parse", "unreadable_file", True)]))


def test_a_quote_that_never_closes_costs_its_line_only(tmp_path):
    # What a person counts: once quoting breaks down, every line is a row (issue 16: an open quote in row
    # 2 of 6 gave input_rows 2; with 3,000 rows after it, 983; a 10 MB quoted cell 9,872 rows for 4).
    spec_of = lambda path: manifests.resolve_spec(ManifestOptions(input=path, id_column="key"))  # noqa: E731
    for after in (4, 3000):
        rows = [f"k{i},img/{i}.jpg,cat\n" for i in range(3, 3 + after)]
        path = write(tmp_path / f"open{after}.csv", "key,uri,labels\nk1,img/1.jpg,cat\nk2,\"img/2.jpg,cat\n" + "".join(rows))
        results = parse(spec_of(path), path)
        assert [r.row for r in results] == list(range(1, 3 + after))
        assert isinstance(results[1], Rejection) and results[1].reason == "malformed_row"
        assert "line 3" in results[1].detail and "never closed" in results[1].detail
        assert all(isinstance(r, Row) for i, r in enumerate(results) if i != 1)
        assert results[-1].id == f"k{2 + after}"

    cell = "\n".join("word " * 20 for _ in range(100_000))  # 10 MB, 100,000 lines, quoted and closed
    path = write(tmp_path / "big_cell.csv", f'key,uri,labels\nk1,img/1.jpg,cat\nk2,img/2.jpg,"{cell}"\n'
                                            'k3,img/3.jpg,dog\nk4,img/4.jpg,cat\n')
    results = parse(spec_of(path), path)
    assert [r.row for r in results] == [1, 2, 3, 4]
    assert results[1].reason == "malformed_row" and "field larger than field limit" in results[1].detail
    assert [r.id for r in results if isinstance(r, Row)] == ["k1", "k3", "k4"]


def test_formats_are_one_table_that_the_flag_and_detection_read(tmp_path):
    """A format is one ManifestFormat subclass in FORMATS: --format's choices, auto-detection's order
    (generic last: it recognises any file) and the parse of a record all come from that table."""
    (fmt,) = [o for o in flags.declared(ManifestOptions) if o.name == "format"]
    assert fmt.choices == ("auto", *manifests.FORMATS) == ("auto", *manifests.MANIFEST_FORMATS)
    assert list(manifests.FORMATS)[-1] == "generic" and manifests.FORMATS["voc"].folder
    planet = write(tmp_path / "train_v2.csv", "image_name,tags\ntrain_1,clear primary\n")
    assert [f.name for f in manifests.FORMATS.values() if not f.folder and f.detect(planet)] == ["planet", "generic"]
    spec = ManifestSpec("planet", (planet,), "uri", "labels", None, "|", "gs://b/chips", "tif", None)
    assert manifests.FORMATS["planet"].parse_record(spec, planet, str(tmp_path), 1,
                                                    {"image_name": "train_1", "tags": "clear primary"}) == Row(
        planet, 1, "train_1", "gs://b/chips/train_1.tif", "gs://b/chips", ("clear", "primary"))
