"""Self-contained HTML pages: the model report, the predict summary, a retrain night and the nights index.

One page is one file: its style, its script (tagbeam/page_assets/) and its data are inline, and a
Content-Security-Policy forbids every request but data: images, so it opens offline from a disk, a
downloaded gs:// copy or an email years later. The data goes in as JSON inside a
<script type="application/json"> element with every character that could end it escaped, and the
script renders it with textContent only: labels, ids and URIs from users' manifests stay text.
"""
from __future__ import annotations

import base64
import html
import json
import os
from typing import Any

import numpy as np

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page_assets")
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
# The page kinds report.js renders (the payload's "kind").
MODEL, PREDICT, NIGHT, NIGHTS_INDEX = "model", "predict", "night", "nights_index"

_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(data: Any) -> str:
    """JSON that is safe inside a <script> element: no `</script>`, `<!--` or line separators can form."""
    text = json.dumps(data, allow_nan=False, separators=(",", ":"))
    return "".join(_ESCAPES.get(c, c) for c in text) if any(c in text for c in _ESCAPES) else text


def float32_base64(values: np.ndarray) -> str:
    """Little-endian float32 bytes as base64: exact scores at 5.3 characters each (the page reads a Float32Array)."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


def data_uri(mime: str, body: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(body).decode('ascii')}"


def _asset(name: str) -> str:
    with open(os.path.join(ASSETS, name), encoding="utf-8") as f:
        return f.read()


def render(kind: str, title: str, data: dict[str, Any]) -> str:
    """The whole page: `data` (JSON-ready, no NaN) is what report.js renders for `kind`."""
    payload = script_json({"kind": kind, "title": title, **data})
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{_asset('page.css')}</style></head>\n<body>"
        "<main id=\"page\"><noscript>This page draws its tables and charts with JavaScript; "
        "allow scripts for this file to see them.</noscript></main>\n"
        f"<script type=\"application/json\" id=\"page-data\">{payload}</script>\n"
        f"<script>{_asset('report.js')}</script>\n</body></html>\n"
    )
