"""Property-based fuzzing of the per-row code: whatever a manifest cell, a URI, a redirect target or
an image holds, each row ends as a Row or an example, or as a dead-letter record - never an exception
that would fail the job. Budgets are small enough for CI (about 30 s in all)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines import fetch, manifests
from pipelines.examples import ExampleOptions, encode_rows
from pipelines.fetch import FetchOptions
from pipelines.images import ImageOptions
from pipelines.manifests import Row
from pipelines.shards import Encoded
from tagbeam.dataset import REJECTION_STAGES, Rejection

from fault_server import Response
from image_factory import encode

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
HOSTILE_URIS = [
    "http://[::1", "http://[127.0.0.1]/x.jpg", "http://[metadata.google.internal]/x.jpg", "https://[::1]]/a",
    "a\x00b.jpg", "/etc/\x00passwd", "file:///etc/passwd", "gs://", "gs:///x", "http://169.254.169.254/latest",
    "http://0x7f.1/x.jpg", "ftp://example.org/x.jpg", "../../etc/passwd", "http://[::ffff:127.0.0.1]/x.jpg",
    "http://[::127.0.0.1]/x.jpg", "http://user:pw@127.0.0.1:99999/x", "http://", "https://:80/", "\\\\server\\share",
    "http://metadata.goog/computeMetadata/v1/", "javascript:alert(1)", "data:image/png;base64,AAAA", " ", "%00",
]
URIS = st.one_of(
    st.sampled_from(HOSTILE_URIS),
    st.text(max_size=60),
    st.builds(lambda scheme, rest: scheme + rest,
              st.sampled_from(["http://", "https://", "gs://", "file://", "", "/", "./", "http://[", "HTTP://"]),
              st.text(max_size=40)),
)


def _image_bytes() -> list[bytes]:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), np.uint8))
    out = [encode(rgb, fmt) for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP")]
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((16, 16, 4), np.uint16))
    return out + [buffer.getvalue()]


SEEDS = _image_bytes()
IMAGES = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda seed, cut: seed[:cut], st.sampled_from(SEEDS), st.integers(0, 400)),
    st.builds(lambda seed, flips: bytes(b ^ (0xFF if i in flips else 0) for i, b in enumerate(seed)),
              st.sampled_from(SEEDS), st.sets(st.integers(0, 200), max_size=8)),
)


def _is_row_outcome(result: object) -> bool:
    return isinstance(result, (Row, Encoded)) or (isinstance(result, Rejection) and result.stage in REJECTION_STAGES)


def test_fetch_turns_any_uri_into_bytes_or_a_fetch_error(tmp_path, outbound_expected):
    (tmp_path / "ok.jpg").write_bytes(b"fine")
    options = FetchOptions(retries=0, timeout_s=1.0)

    @FUZZ
    @given(uri=URIS)
    def check(uri: str) -> None:
        try:
            fetch.fetch(uri, options, str(tmp_path))
        except fetch.FetchError as err:
            assert err.reason and err.detail
        assert all(isinstance(r, (fetch.Fetched, fetch.FetchError)) for r in fetch.fetch_many([uri, "ok.jpg"], options,
                                                                                               str(tmp_path)))

    check()
    assert fetch.fetch("ok.jpg", options, str(tmp_path)) == b"fine"


def test_redirects_to_anything_end_as_fetch_errors(http_server):
    options = FetchOptions(allow_loopback=True, retries=0, timeout_s=2.0)
    targets = st.one_of(st.sampled_from(HOSTILE_URIS[:4] + ["http://[::1", "gs://b/x", "file:///etc/passwd"]),
                        st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(target=targets)
    def check(target: str) -> None:
        url = http_server.route("/hop", Response(status=302, headers={"Location": target}))
        try:
            fetch.fetch(url, options)
        except fetch.FetchError as err:
            assert err.reason

    check()


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_any_manifest_text_parses_into_rows_or_rejections(tmp_path, kind):
    cells = st.text(max_size=30)

    @FUZZ
    @given(rows=st.lists(st.tuples(cells, cells, cells), max_size=8), raw=st.text(max_size=200))
    def check(rows: list[tuple[str, str, str]], raw: str) -> None:
        path = tmp_path / f"m.{kind}"
        if kind == "csv":
            import csv

            with open(path, "w", newline="", encoding="utf-8", errors="surrogatepass") as f:
                writer = csv.writer(f)
                writer.writerow(["uri", "labels", "key"])
                writer.writerows(rows)
                f.write(raw)
        else:
            import json

            lines = [json.dumps({"uri": u, "labels": lab, "key": k}) for u, lab, k in rows]
            path.write_text("\n".join(lines + [raw, "[" * 50_000]), encoding="utf-8", errors="surrogatepass")
        # The per-row parser itself (resolve_spec's job-level checks, such as "no data rows", come before).
        spec = manifests.ManifestSpec("generic", (str(path),), "uri", "labels", "key", "|", None, "jpg", None)
        with open(path, "rb") as handle:
            results = list(manifests.parse_table(spec, str(path), handle))
        assert all(_is_row_outcome(r) for r in results)

    check()


def test_csv_records_are_grouped_by_the_csv_modules_own_quoting_rules():
    # The line grouping that lets a broken quote cost one line must agree with the csv module wherever
    # the file is well-formed, and must give every physical line to exactly one record, in order.
    import csv
    import re

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(st.text(alphabet=["a", ",", '"', "\n", " ", "\r", "\\"], max_size=60))
    def check(text: str) -> None:
        lines = re.findall(r"[^\n]*\n|[^\n]+$", text)
        groups = list(manifests._csv_line_groups(lines))
        covered: list[str] = []
        for first, group, _ in groups:
            assert first == len(covered) + 1
            covered.extend(group)
        assert covered == lines
        if all(complete for _, _, complete in groups):
            try:
                expected = list(csv.reader(lines))
            except csv.Error:
                return
            assert [next(csv.reader(group), []) for _, group, _ in groups] == expected

    check()


def test_any_image_bytes_become_an_example_or_a_dead_letter_record(tmp_path, outbound_expected):
    options = ExampleOptions(FetchOptions(), ImageOptions(size=16), 0.1, 0.1, keep_unlabeled=False,
                             revalidate="none")

    @FUZZ
    @given(blobs=st.lists(IMAGES, min_size=1, max_size=4), uris=st.lists(URIS, max_size=2))
    def check(blobs: list[bytes], uris: list[str]) -> None:
        rows = []
        for i, blob in enumerate(blobs):
            (tmp_path / f"{i}.img").write_bytes(blob)
            rows.append(Row("m.csv", i + 1, f"id{i}", str(tmp_path / f"{i}.img"), str(tmp_path), ("a",)))
        rows += [Row("m.csv", 10 + i, f"u{i}", uri, str(tmp_path), ("a",)) for i, uri in enumerate(uris)]
        results = encode_rows(rows, ["a"], options)
        assert len(results) == len(rows) and all(_is_row_outcome(r) for r in results)

    check()
