"""A real HTTP server on 127.0.0.1 whose responses tests script per path, faults included.

Downloads are tested against real sockets rather than mocks: a route is a list of
responses served in order (the last one repeats), so "500 then 200" or "time-out" are data.
"""
from __future__ import annotations

import dataclasses
import http.server
import threading
import time
from collections.abc import Iterable


@dataclasses.dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    content_type: str = "application/octet-stream"
    # Sleep before answering: makes a client time-out without a real slow network.
    delay_s: float = 0.0
    # Advertise this Content-Length while sending `body` only: a truncated transfer.
    declared_length: int | None = None
    # Stream this many filler bytes after `body`: an oversized download without a big buffer.
    stream_extra_bytes: int = 0
    # Validators: sent with a 200, and a request whose If-None-Match (or, without an ETag,
    # If-Modified-Since) matches them is answered 304 without a body, as a static file server does.
    etag: str | None = None
    last_modified: str | None = None


def redirect(location: str, status: int = 302) -> Response:
    return Response(status=status, headers={"Location": location})


class _Server(http.server.ThreadingHTTPServer):
    # A deep listen queue: concurrent-download tests open many connections at once.
    request_queue_size = 64
    daemon_threads = True


class FaultServer:
    """Serves scripted responses; records every request path for assertions."""

    def __init__(self) -> None:
        self._routes: dict[str, list[Response]] = {}
        self._lock = threading.Lock()
        self.requests: list[str] = []
        self.answers: list[tuple[str, int]] = []  # (path, status) of every answer sent
        handler = self._make_handler()
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self.port = self._httpd.server_address[1]
        # A short poll interval keeps shutdown (once per test) from costing half a second.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def route(self, path: str, responses: Response | Iterable[Response]) -> str:
        """Scripts `path`; returns its absolute URL."""
        items = [responses] if isinstance(responses, Response) else list(responses)
        with self._lock:
            self._routes[path] = items
        return self.url(path)

    def serve(self, path: str, body: bytes, content_type: str = "image/jpeg") -> str:
        return self.route(path, Response(body=body, content_type=content_type))

    def hits(self, path: str) -> int:
        with self._lock:
            return sum(1 for p in self.requests if p == path)

    def statuses(self) -> dict[int, int]:
        """How many answers of each status were sent."""
        with self._lock:
            counts: dict[int, int] = {}
            for _, status in self.answers:
                counts[status] = counts.get(status, 0) + 1
            return counts

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next(self, path: str) -> Response:
        with self._lock:
            self.requests.append(path)
            queue = self._routes.get(path)
            if not queue:
                return Response(status=404, body=b"not found", content_type="text/plain")
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def _make_handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                resp = server._next(path)
                if resp.delay_s:
                    time.sleep(resp.delay_s)
                validators = {k: v for k, v in (("ETag", resp.etag), ("Last-Modified", resp.last_modified)) if v}
                if resp.status == 200 and (
                        (resp.etag and self.headers.get("If-None-Match") == resp.etag)
                        or (not resp.etag and resp.last_modified
                            and self.headers.get("If-Modified-Since") == resp.last_modified)):
                    resp = Response(status=304, headers=validators)
                    validators = {}
                length = resp.declared_length
                if length is None:
                    length = len(resp.body) + resp.stream_extra_bytes
                with server._lock:
                    server.answers.append((path, resp.status))
                try:
                    self.send_response(resp.status)
                    self.send_header("Content-Type", resp.content_type)
                    self.send_header("Content-Length", str(length))
                    for key, value in {**resp.headers, **validators}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(resp.body)
                    chunk = b"\0" * 65536
                    left = resp.stream_extra_bytes
                    while left > 0:
                        self.wfile.write(chunk[: min(left, len(chunk))])
                        left -= len(chunk)
                    if resp.declared_length is not None:
                        # Close mid-body so the client sees a short read, not a hang.
                        self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    # Clients that stop reading oversized bodies hang up on purpose.
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        return Handler
