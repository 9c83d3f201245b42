"""Reads the supported manifest formats into rows: (file, row, id, uri, labels).

Formats (docs/dataset.md names the ids each produces):
- ``movie_genre``: Kaggle's MovieGenre.csv (``imdbId,Imdb Link,Title,IMDB Score,Genre,Poster``,
  genres joined by ``|``, Poster = image URL). The real file mixes UTF-8 and Latin-1/CP1252 titles.
- ``planet``: Kaggle's ``train_v2.csv`` (``image_name,tags``, tags joined by spaces) plus an image
  root holding ``<image_name>.<ext>``.
- ``voc``: a VOC2012 root: ``Annotations/<id>.xml`` give the set of ``object/name`` per image,
  ``JPEGImages/<filename>`` the image, ``ImageSets/Main/<set>.txt`` an optional subset.
- ``generic``: CSV, JSONL or Parquet with a URI column, a labels column (a list or a delimited
  string) and an optional id column (default: the URI as written in the manifest).

How files are read, and why: every manifest file is parsed whole by one DoFn call (files are spread
over workers, rows are not). Splitting a CSV by lines is unsafe here: quoted fields may hold
newlines, and MovieGenre.csv's encoding has to be decided per line, which only a reader that sees
every line in order can do while keeping row numbers. JSONL and Parquet are read the same way
because the dead-letter record needs each row's 1-based number within its file, which splittable
reads (ReadFromText, ReadFromParquet) do not provide. Manifests are small next to their images
(MovieGenre.csv: 40k rows, 8 MB), and downstream stages are reshuffled, so the images are still
fetched in parallel.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines.fetch import FetchError, resolve_uri
from pipelines.outcomes import REJECTED_TAG, count, reject_row, rejected, rejection
from tagbeam import flags
from tagbeam.dataset import Rejection, check_label, unexpected
from tagbeam.flags import UsageError, option

MOVIE_GENRE_COLUMNS = ("imdbId", "Imdb Link", "Title", "IMDB Score", "Genre", "Poster")
PLANET_COLUMNS = ("image_name", "tags")

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")
# Compressed manifests are read through Beam's FileSystems, which decompresses by extension.
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".deflate")


class Row(NamedTuple):
    file: str  # manifest file the row came from (for VOC: the id list)
    row: int  # 1-based data row number within `file`, header excluded
    id: str
    uri: str  # resolved: absolute local path, gs://, or http(s)://
    base: str | None  # folder relative URIs were resolved against; fetch confines local reads to it
    labels: tuple[str, ...]  # stripped, non-empty, first occurrence kept


def clean_labels(values: Iterable[Any]) -> tuple[str, ...]:
    """Strips labels, drops empty ones and repeats (keeping first-seen order)."""
    stripped = (str(v).strip() for v in values if v is not None)
    return tuple(dict.fromkeys(v for v in stripped if v))


def split_labels(value: Any, delimiter: str) -> tuple[str, ...]:
    """A labels cell: a list (JSONL, Parquet), a delimited string, or nothing."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return clean_labels(value)
    text = str(value)
    return clean_labels(text.split() if delimiter == " " else text.split(delimiter))


@dataclasses.dataclass(frozen=True)
class ManifestSpec:
    """Everything a worker needs to parse the manifest; built and validated by `resolve_spec`."""

    format: str
    files: tuple[str, ...]  # manifest files (for VOC: the dataset root)
    uri_column: str
    labels_column: str | None  # None: rows carry no labels (prediction)
    id_column: str | None
    label_delimiter: str
    image_root: str | None  # planet
    image_ext: str  # planet
    voc_image_set: str | None


# --- reading text safely --------------------------------------------------------------------

def decode_line(raw: bytes) -> tuple[str, str]:
    """Decodes one line: UTF-8, else CP1252, else Latin-1 (which never fails). Returns (text, codec).

    MovieGenre.csv is mostly ASCII with Latin-1/CP1252 titles; deciding per line keeps the UTF-8
    lines of a mixed file intact instead of mis-decoding the whole file one way.
    """
    for codec in ("utf-8", "cp1252"):
        try:
            return raw.decode(codec), codec
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1"), "latin-1"


def text_lines(handle: io.IOBase) -> Iterator[str]:
    """Decoded lines of a binary file, line ends kept (the csv module needs them inside quotes)."""
    first = True
    while raw := handle.readline():
        text, codec = decode_line(raw)
        if codec != "utf-8":
            count(f"lines_decoded_{codec.replace('-', '')}")
        if first:
            text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark from spreadsheet exports
            first = False
        yield text


def manifest_kind(path: str) -> str:
    """'parquet', 'jsonl' or 'csv', from the file name (compression suffixes ignored)."""
    name = path.lower()
    for suffix in _COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    return "csv"


def folder_of(path: str) -> str:
    """The folder of a local or gs:// path, against which its relative URIs are resolved."""
    if "://" in path:
        return posixpath.dirname(path)
    return os.path.dirname(os.path.abspath(path))


# --- header inspection (driver side, for clear errors before any pipeline runs) -------------------

@dataclasses.dataclass(frozen=True)
class Header:
    columns: tuple[str, ...]
    has_rows: bool


def read_header(path: str) -> Header:
    """Column names of a manifest file and whether it has at least one data row. A file that cannot
    be read as its kind (a corrupt .gz, a .parquet that is not Parquet, a header cell beyond the CSV
    field limit) is a UsageError naming it: a job-level problem, found before any work."""
    try:
        return _read_header(path)
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - gzip, zlib, pyarrow and csv each raise their own
        raise UsageError(f"--input {path}: cannot read it as a {manifest_kind(path)} manifest "
                         f"({type(err).__name__}: {str(err)[:200]}); check the file and its extension") from None


def _read_header(path: str) -> Header:
    kind = manifest_kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        with FileSystems.open(path) as handle:
            meta = pq.ParquetFile(handle)
            return Header(tuple(meta.schema_arrow.names), meta.metadata.num_rows > 0)
    with FileSystems.open(path) as handle:
        if kind == "csv":  # the header record as the workers will read it (a name may hold a line break)
            records = (group for _, group, _ in _csv_line_groups(text_lines(handle)) if "".join(group).strip())
            header = next(records, None)
            if header is None:
                return Header((), False)
            return Header(tuple(c.strip() for c in next(csv.reader(header), [])), next(records, None) is not None)
        lines = (line for line in text_lines(handle) if line.strip())
        first = next(lines, None)
        if first is None:
            return Header((), False)
    if kind == "jsonl":
        try:
            record = json.loads(first)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: the first line is not JSON ({err}); a .jsonl manifest holds one "
                             "JSON object per line") from None
        if not isinstance(record, dict):
            raise UsageError(f"{path}: the first line is not a JSON object; a .jsonl manifest holds one "
                             "JSON object per line")
        return Header(tuple(record), True)
    raise AssertionError(kind)


def detect_format(path: str) -> str:
    """The format of one manifest file, from its name and header (auto-detection): the first file
    format of FORMATS that recognises it (generic recognises every file, and comes last)."""
    return next(f.name for f in FORMATS.values() if not f.folder and f.detect(path))


def required_columns(spec: ManifestSpec) -> tuple[str, ...]:
    return FORMATS[spec.format].required_columns(spec)


def _is_remote(path: str) -> bool:
    return "://" in path


def _exists_under(folder: str) -> bool:
    """Whether a folder exists: locally a directory, on object stores any object below it."""
    if not _is_remote(folder):
        return os.path.isdir(folder)
    try:
        return bool(FileSystems.match([folder.rstrip("/") + "/*"], limits=[1])[0].metadata_list)
    except Exception:  # noqa: BLE001 - BeamIOError wraps whatever the store raised
        return False


def _match(pattern: str) -> list[str]:
    try:
        matched = FileSystems.match([pattern])[0].metadata_list
    except Exception:  # noqa: BLE001 - BeamIOError for a missing path, bucket or bad pattern
        return []
    return sorted(m.path for m in matched if not os.path.isdir(m.path))


def resolve_spec(options: ManifestOptions, with_labels: bool = True) -> ManifestSpec:
    """Finds the manifest files, decides the format and checks columns and emptiness, so that
    user mistakes fail here with one clear UsageError rather than inside a pipeline."""
    input_, format_ = options.input, options.format
    root = input_.rstrip("/")
    spec = ManifestSpec(format_, (root,), options.uri_column, options.labels_column if with_labels else None,
                        options.id_column, options.label_delimiter, None, options.image_ext.lstrip("."),
                        options.voc_image_set)
    for folder_format in (f for f in FORMATS.values() if f.folder and format_ in ("auto", f.name)):
        if folder_format.detect(root):
            return folder_format.complete(dataclasses.replace(spec, format=folder_format.name), options)
        if format_ == folder_format.name:
            raise UsageError(f"--input {input_}: {folder_format.missing_hint}")
    if not _is_remote(input_) and os.path.isdir(input_):
        raise UsageError(f"--input {input_} is a folder without Annotations/; give a manifest file or glob, "
                         "or a VOC2012 root")
    files = _match(input_)
    if not files:
        raise UsageError(f"--input {input_}: no such file (nothing matches); give a manifest path, glob or gs:// URI")
    format_ = detect_format(files[0]) if format_ == "auto" else format_
    spec = dataclasses.replace(spec, format=format_, files=tuple(files), voc_image_set=None)
    header = read_header(files[0])
    if not header.columns:
        raise UsageError(f"--input {files[0]} is empty; a manifest needs a header line and data rows")
    missing = [c for c in required_columns(spec) if c not in header.columns]
    if missing:
        raise UsageError(f"{files[0]}: missing column(s) {', '.join(missing)} for --format {format_}; "
                         f"found {list(header.columns)}; {FORMATS[format_].missing_hint}")
    if not header.has_rows and not any(read_header(f).has_rows for f in files[1:]):
        raise UsageError(f"--input {input_}: the manifest has no data rows (an empty file or a header only)")
    return FORMATS[format_].complete(spec, options)


def _planet_root(manifest: str, image_root: str | None) -> str:
    if image_root is None:
        root = f"{folder_of(manifest)}/train-jpg"
        where = f"the default {root} (Kaggle's layout: train-jpg/ next to the manifest)"
    else:
        root = image_root if _is_remote(image_root) else os.path.abspath(image_root)
        where = f"--image_root {image_root}"
    root = root.rstrip("/")
    if not root.startswith(("http://", "https://")) and not _exists_under(root):
        raise UsageError(f"{where} does not exist; Planet images are read as <image_root>/<image_name>.<ext>: "
                         "pass --image_root with their folder, gs:// or http(s):// prefix")
    return root


def _voc_spec(spec: ManifestSpec) -> ManifestSpec:
    root, image_set = spec.files[0], spec.voc_image_set
    if image_set:
        listing = f"{root}/ImageSets/Main/{image_set}.txt"
        if not _match(listing):
            raise UsageError(f"--voc_image_set {image_set}: {listing} does not exist; use a set from "
                             "ImageSets/Main (e.g. train, val, trainval) or omit the flag for all annotations")
    if not voc_ids(spec)[1]:
        raise UsageError(f"--input {root}: the VOC image list is empty (no Annotations/*.xml or an empty set)")
    return spec


# --- per-format row parsers (pure Python: unit-testable without Beam) -------------------------------

ParseResult = Row | Rejection


def _row_or_reject(file: str, row: int, id_: str, uri: str, base: str | None,
                   labels: tuple[str, ...]) -> ParseResult:
    id_, uri = id_.strip(), uri.strip()
    if not id_:
        return rejection(file, row, id_, uri, "parse", "missing_id", f"row {row} of {file} has no id")
    if not uri:
        return rejection(file, row, id_, uri, "parse", "missing_uri", f"row {row} of {file} has no image URI")
    for label in labels:
        problem = check_label(label)  # labels.txt holds one label per line: a line break would split it
        if problem:
            return rejection(file, row, id_, uri, "parse", "bad_label", f"label {label[:80]!r}: {problem}")
    try:
        resolved = resolve_uri(uri, base)
    except FetchError as err:
        return rejection(file, row, id_, uri, "parse", err.reason, err.detail)
    return Row(file, row, id_, resolved, base, labels)


# A quoted field may hold line breaks, so a record may span lines; one that is still open after this
# much text is taken as a quote that never closes (no real manifest row is this long), which also
# bounds what is held while looking for the closing quote.
_MAX_RECORD_CHARS = 16 * 2**20


def _quote_open_after(line: str, open_at_start: bool) -> bool:
    """Whether a quoted field is still open at the end of `line`, by the rules of Python's csv module
    (excel dialect): a quote opens a field only at the field's start, "" inside one is a quote, and
    after the closing quote the rest of the field is plain text."""
    in_quotes, pos = open_at_start, 0
    while True:
        if in_quotes:
            quote = line.find('"', pos)
            if quote < 0:
                return True
            if line.startswith('"', quote + 1):
                pos = quote + 2
                continue
            in_quotes = False
            pos = quote + 1
        elif line.startswith('"', pos):
            in_quotes, pos = True, pos + 1
            continue
        comma = line.find(",", pos)
        if comma < 0:
            return False
        pos = comma + 1


def _csv_line_groups(lines: Iterable[str]) -> Iterator[tuple[int, list[str], bool]]:
    """(first line number, lines, complete): the physical lines of each CSV record. A record whose
    quote never closes (the file ends, or _MAX_RECORD_CHARS pass, inside it) is given as its first line
    alone with complete=False, and reading goes on at the line after it: one stray quote costs one
    row, not every row after it, and the rows counted are the lines a person sees."""
    source = iter(enumerate(lines, 1))
    pending: collections.deque[tuple[int, str]] = collections.deque()
    while True:
        first = pending.popleft() if pending else next(source, None)
        if first is None:
            return
        group = [first]
        size = len(first[1])
        open_quote = _quote_open_after(first[1], False)
        while open_quote and size <= _MAX_RECORD_CHARS:
            item = pending.popleft() if pending else next(source, None)
            if item is None:
                break
            group.append(item)
            size += len(item[1])
            open_quote = _quote_open_after(item[1], True)
        if open_quote:
            pending.extendleft(reversed(group[1:]))
            yield first[0], [first[1]], False
        else:
            yield first[0], [text for _, text in group], True


def _csv_records(path: str, handle: io.IOBase) -> Iterator[tuple[int, dict[str, str] | str]]:
    """(row number, {column: value}) per CSV data row, or (row number, error) for malformed rows."""
    header = None
    number = 0
    for line, group, complete in _csv_line_groups(text_lines(handle)):
        try:
            record = next(csv.reader(group), [])
        except csv.Error as err:
            record = None
            problem = f"malformed CSV at line {line} of {path}: {err}"
        if not complete and header is not None:
            record = None
            problem = (f"line {line} of {path} opens a quoted field that is never closed; this line is "
                       "rejected alone and reading goes on at the next line")
        if record is not None and (not record or (len(record) == 1 and not record[0].strip())):
            continue  # blank lines are not rows
        if header is None:
            if record is None:  # read_header refused this file before the job started
                raise UsageError(f"{path}: cannot read the header: {problem}")
            header = [c.strip() for c in record]
            continue
        number += 1
        if record is None:
            yield number, problem
        elif len(record) != len(header):
            yield number, f"line {line}: expected {len(header)} fields ({','.join(header)}), got {len(record)}"
        else:
            yield number, dict(zip(header, record, strict=True))


def _table_records(path: str, handle: io.IOBase, columns: list[str]) -> Iterator[tuple[int, dict | str]]:
    kind = manifest_kind(path)
    if kind == "csv":
        yield from _csv_records(path, handle)
    elif kind == "jsonl":
        number = 0
        for line in text_lines(handle):
            if not line.strip():
                continue
            number += 1
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than the parser goes
                yield number, f"not JSON: {type(err).__name__}: {str(err)[:200]}"
                continue
            yield number, record if isinstance(record, dict) else f"not a JSON object: {line[:80]!r}"
    else:
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(handle).iter_batches(columns=columns):
            for record in batch.to_pylist():
                number += 1
                yield number, record


def parse_table(spec: ManifestSpec, path: str, handle: io.IOBase) -> Iterator[ParseResult]:
    """Rows of one movie_genre, planet or generic manifest file, in file order."""
    base = folder_of(path)
    columns = list(required_columns(spec))
    for number, record in _table_records(path, handle, columns):
        try:
            yield _parse_record(spec, path, base, columns, number, record)
        except Exception as err:  # noqa: BLE001 - whatever a cell holds, it costs its row only
            reason, detail = unexpected(err)
            yield rejection(path, number, "", "", "parse", reason, f"row {number} of {path}: {detail}")


def _parse_record(spec: ManifestSpec, path: str, base: str, columns: list[str], number: int,
                  record: dict | str) -> ParseResult:
    if isinstance(record, str):
        return rejection(path, number, "", "", "parse", "malformed_row", record)
    missing = [c for c in columns if c not in record]
    if missing:
        return rejection(path, number, "", "", "parse", "missing_column",
                         f"row {number} of {path} lacks {missing}; it has {sorted(record)}")
    return FORMATS[spec.format].parse_record(spec, path, base, number, record)


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


class _NoDoctype(ET.TreeBuilder):
    """Refuses any DOCTYPE. ElementTree (expat) never fetches external entities, but it does
    expand internal ones, so an internal-subset "billion laughs" could blow up memory. Entities
    can only be declared inside a DOCTYPE, and expat reports the DOCTYPE to the tree builder
    before any entity is declared or used, so raising here stops the parse in time. VOC
    annotations never carry a DOCTYPE."""

    def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
        raise ValueError(f"DOCTYPE {name!r} is not allowed (entity declarations are refused)")


def parse_voc_annotation(data: bytes) -> tuple[str | None, tuple[str, ...]]:
    """(filename, object names) of one VOC annotation. Raises ValueError or ET.ParseError."""
    parser = ET.XMLParser(target=_NoDoctype())
    parser.feed(data)
    root = parser.close()
    filename = (root.findtext("filename") or "").strip() or None
    return filename, clean_labels(obj.findtext("name") for obj in root.iter("object"))


def _not_a_file_name(name: str) -> str | None:
    """Why `name` (a Planet image_name, a VOC id) is not a plain file name: such names are joined to a
    folder, so a path or a URL in them would read outside it."""
    if any(c in name for c in "/\\:\x00") or name in (".", ".."):
        return f"{name[:100]!r} is not a plain file name (no '/', '\\', ':' or NUL; not '.' or '..')"
    return None


def voc_row(spec: ManifestSpec, source: str, number: int, image_id: str) -> ParseResult:
    problem = _not_a_file_name(image_id)
    if problem:
        return rejection(source, number, image_id, "", "parse", "bad_id", f"VOC image id {problem}")
    root = spec.files[0]
    path = f"{root.rstrip('/')}/Annotations/{image_id}.xml"
    try:
        with FileSystems.open(path) as handle:
            data = handle.read()
    except OSError as err:  # Beam raises BeamIOError (an IOError) for missing files
        return rejection(source, number, image_id, "", "parse", "missing_annotation", f"cannot read {path}: {err}")
    try:
        filename, labels = parse_voc_annotation(data)
    except (ET.ParseError, ValueError) as err:
        return rejection(source, number, image_id, "", "parse", "bad_xml", f"{path}: {err}")
    return _row_or_reject(source, number, image_id, f"JPEGImages/{filename or image_id + '.jpg'}", root, labels)


def voc_ids(spec: ManifestSpec) -> tuple[str, list[str]]:
    """(source, image ids in order): the ImageSets list if a set is given, else every annotation."""
    root = spec.files[0].rstrip("/")
    if spec.voc_image_set:
        source = f"{root}/ImageSets/Main/{spec.voc_image_set}.txt"
        with FileSystems.open(source) as handle:
            # Class-specific lists ("<id> -1") carry a flag after the id; the id comes first.
            ids = [line.split()[0] for line in text_lines(handle) if line.strip()]
        return source, ids
    matched = FileSystems.match([f"{root}/Annotations/*.xml"])[0].metadata_list
    ids = sorted(posixpath.basename(m.path)[: -len(".xml")] for m in matched)
    return f"{root}/Annotations", ids


# --- Beam transforms ----------------------------------------------------------------------------

# --- the formats: one class each, in one table (FORMATS) ---------------------------------------

class ManifestFormat:
    """A manifest format: how it is recognised, the columns it needs, what a spec needs resolved
    before the job (resolve_spec), and how a record becomes a row with its id and labels. Adding a
    format is one subclass added to FORMATS (and its line in docs/dataset.md and README's table)."""

    name: ClassVar[str]
    folder: ClassVar[bool] = False  # the input is a folder (VOC), recognised before any file is matched
    missing_hint: ClassVar[str] = ""  # what to do when its columns (or, for a folder, its layout) are missing

    def detect(self, path: str) -> bool:
        """Whether auto-detection takes `path` (a file's name and header, or a folder) for this format."""
        raise NotImplementedError

    def required_columns(self, spec: ManifestSpec) -> tuple[str, ...]:
        return ()

    def complete(self, spec: ManifestSpec, options: ManifestOptions) -> ManifestSpec:
        """The spec with what this format resolves on the driver (checked, so a mistake is a UsageError)."""
        return spec

    def parse_record(self, spec: ManifestSpec, path: str, base: str, number: int, record: dict) -> ParseResult:
        """One table record (its required columns present) -> a Row or its rejection."""
        raise NotImplementedError

    def inputs(self, spec: ManifestSpec) -> tuple[list[Any], beam.DoFn]:
        """What the pipeline spreads over workers, and the DoFn that parses one of them: a file each."""
        return list(spec.files), _ParseFile(spec)


def _csv_columns(path: str) -> tuple[str, ...] | None:
    return read_header(path).columns if manifest_kind(path) == "csv" else None


class MovieGenre(ManifestFormat):
    """Kaggle's MovieGenre.csv: id imdbId, image Poster, labels Genre split on |."""

    name = "movie_genre"
    missing_hint = "this is not a movie_genre manifest; pass --format"

    def detect(self, path: str) -> bool:
        columns = _csv_columns(path)
        return columns is not None and columns[:1] == ("imdbId",) and "Poster" in columns

    def required_columns(self, spec: ManifestSpec) -> tuple[str, ...]:
        return ("imdbId", "Genre", "Poster")

    def parse_record(self, spec: ManifestSpec, path: str, base: str, number: int, record: dict) -> ParseResult:
        return _row_or_reject(path, number, record["imdbId"] or "", record["Poster"] or "", base,
                              split_labels(record["Genre"], "|"))


class Planet(ManifestFormat):
    """Kaggle's train_v2.csv: id image_name (a plain file name), image <image_root>/<image_name>.<ext>,
    labels tags split on spaces."""

    name = "planet"
    missing_hint = "this is not a planet manifest; pass --format"

    def detect(self, path: str) -> bool:
        return _csv_columns(path) == PLANET_COLUMNS

    def required_columns(self, spec: ManifestSpec) -> tuple[str, ...]:
        return PLANET_COLUMNS

    def complete(self, spec: ManifestSpec, options: ManifestOptions) -> ManifestSpec:
        return dataclasses.replace(spec, image_root=_planet_root(spec.files[0], options.image_root))

    def parse_record(self, spec: ManifestSpec, path: str, base: str, number: int, record: dict) -> ParseResult:
        name = (record["image_name"] or "").strip()
        problem = _not_a_file_name(name) if name else None
        if problem:
            return rejection(path, number, name, "", "parse", "bad_image_name", f"Planet image_name {problem}")
        uri = f"{name}.{spec.image_ext}" if name else ""
        return _row_or_reject(path, number, name, uri, spec.image_root, split_labels(record["tags"], " "))


class Voc(ManifestFormat):
    """A VOC2012 root: id the annotation's file id, image JPEGImages/<filename>, labels the set of
    object/name; one annotation per work item instead of one file."""

    name = "voc"
    folder = True
    missing_hint = ("no Annotations/ folder there; for --format voc give the VOC2012 root (the folder holding "
                    "Annotations/, JPEGImages/ and ImageSets/)")

    def detect(self, path: str) -> bool:
        return _exists_under(f"{path}/Annotations")

    def complete(self, spec: ManifestSpec, options: ManifestOptions) -> ManifestSpec:
        return _voc_spec(spec)

    def inputs(self, spec: ManifestSpec) -> tuple[list[Any], beam.DoFn]:
        source, ids = voc_ids(spec)
        return [(source, i + 1, image_id) for i, image_id in enumerate(ids)], _ParseVoc(spec)


class Generic(ManifestFormat):
    """CSV, JSONL or Parquet: image --uri_column, labels --labels_column (a list, or a string split by
    --label_delimiter), id --id_column (default: the URI as written). Recognises any file: last."""

    name = "generic"
    missing_hint = "name them with --uri_column/--labels_column/--id_column"

    def detect(self, path: str) -> bool:
        return True

    def required_columns(self, spec: ManifestSpec) -> tuple[str, ...]:
        return tuple(c for c in (spec.uri_column, spec.labels_column, spec.id_column) if c)

    def parse_record(self, spec: ManifestSpec, path: str, base: str, number: int, record: dict) -> ParseResult:
        raw_uri = _cell(record[spec.uri_column])
        id_ = _cell(record[spec.id_column]) if spec.id_column else raw_uri
        # No labels column (batch prediction): rows carry no labels.
        labels = split_labels(record[spec.labels_column], spec.label_delimiter) if spec.labels_column else ()
        return _row_or_reject(path, number, id_, raw_uri, base, labels)


# Auto-detection tries the file formats in this order; --format lists them in it.
FORMATS: dict[str, ManifestFormat] = {f.name: f for f in (MovieGenre(), Planet(), Voc(), Generic())}
MANIFEST_FORMATS = tuple(FORMATS)


@flags.group
class ManifestOptions:
    """Input: the manifest and its layout."""

    input: str = option(help="manifest file, glob or gs:// URI; for VOC the VOC2012 root folder")
    format: str = option("auto", choices=("auto", *MANIFEST_FORMATS),
                         help="auto: MovieGenre header -> movie_genre, image_name,tags -> planet, a folder with "
                              "Annotations/ -> voc, any other CSV/JSONL/Parquet -> generic")
    uri_column: str = option("uri", help="generic manifests: the image URI column")
    labels_column: str = option("labels", help="generic manifests: the labels column, a list or a string split by "
                                               "--label_delimiter")
    id_column: str | None = option(None, help="generic manifests: the id column (default: the URI as written)")
    label_delimiter: str = option("|", help="generic manifests: separator of labels in a string cell")
    image_root: str | None = option(None, help="Planet image folder, gs:// or http(s):// prefix (default: train-jpg/ "
                                               "next to the manifest)")
    image_ext: str = option("jpg", help="Planet image extension (jpg or tif)")
    voc_image_set: str | None = option(None, help="VOC: use ImageSets/Main/<set>.txt (e.g. train, val, trainval); "
                                                  "default all annotations")


# --- Beam transforms --------------------------------------------------------------------------------

class _ParseFile(beam.DoFn):
    def __init__(self, spec: ManifestSpec) -> None:
        self._spec = spec

    def process(self, path: str) -> Iterator[Any]:
        number = 0
        try:
            with FileSystems.open(path) as handle:
                for result in parse_table(self._spec, path, handle):
                    number = result.row  # a Row or a Rejection
                    yield from _emit([result])
        except Exception as err:  # noqa: BLE001 - a file that breaks mid-way (corrupt compression) costs its rest
            yield rejected(rejection(path, number + 1, "", "", "parse", "unreadable_file",
                                     f"reading {path} stopped after row {number}: {type(err).__name__}: "
                                     f"{str(err)[:200]}; the rows after it could not be read"))


class _ParseVoc(beam.DoFn):
    def __init__(self, spec: ManifestSpec) -> None:
        self._spec = spec

    def process(self, item: tuple[str, int, str]) -> Iterator[Any]:
        yield from _emit([voc_row(self._spec, *item)])


def _emit(results: Iterable[ParseResult]) -> Iterator[Any]:
    for result in results:
        count("rows_read")
        if isinstance(result, Row):
            count("rows_parsed")
            yield result
        else:
            yield rejected(result)


class ReadManifest(beam.PTransform):
    """Manifest -> PCollections `rows` (Row) and `rejected` (Rejection)."""

    def __init__(self, spec: ManifestSpec) -> None:
        super().__init__()
        self._spec = spec

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.pvalue.DoOutputsTuple:
        spec = self._spec
        items, parse = FORMATS[spec.format].inputs(spec)
        # The reshuffle spreads files (or annotations) over workers instead of one bundle.
        return (pbegin
                | "ListInputs" >> beam.Create(items)
                | "SpreadInputs" >> beam.Reshuffle()
                | "Parse" >> beam.ParDo(parse).with_outputs(REJECTED_TAG, main="rows"))


class _KeepFirst(beam.DoFn):
    def process(self, item: tuple[str, Iterable[Row]]) -> Iterator[Any]:
        _, rows = item
        first, *others = sorted(rows, key=lambda r: (r.file, r.row))
        yield first
        for other in others:
            yield rejected(reject_row(other, "duplicate", "duplicate_id",
                                      f"id {other.id!r} already seen at row {first.row} of {first.file}"))


class DropDuplicateIds(beam.PTransform):
    """Keeps the first row (lowest file, row number) of each id; the others go to `rejected`."""

    def expand(self, rows: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        return (rows
                | "KeyById" >> beam.Map(lambda r: (r.id, r))
                | "GroupById" >> beam.GroupByKey()
                | "KeepFirst" >> beam.ParDo(_KeepFirst()).with_outputs(REJECTED_TAG, main="rows"))
