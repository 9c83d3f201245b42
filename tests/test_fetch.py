"""pipelines.fetch against real sockets: the fault server, a raw streaming server, TLS, the GCS emulator."""
from __future__ import annotations

import datetime
import http.server
import os
import pickle
import socket
import ssl
import threading
import time
import urllib.request

import pytest

from pipelines.fetch import FetchError, FetchOptions, fetch, fetch_many, resolve_uri

from fault_server import Response, redirect

# Loopback is where the test servers live; short back-offs keep retries fast.
LOCAL = FetchOptions(allow_loopback=True, backoff_s=0.01, timeout_s=2.0)


def reason_of(uri: str, options: FetchOptions = LOCAL, base: str | None = None) -> str:
    with pytest.raises(FetchError) as err:
        fetch(uri, options, base)
    return err.value.reason


def test_ok_and_error_statuses_retry_only_what_is_transient(http_server):
    assert fetch(http_server.serve("/ok.jpg", b"jpeg bytes"), LOCAL) == b"jpeg bytes"

    missing = http_server.route("/gone.jpg", Response(status=404))
    assert reason_of(missing) == "http_404"
    assert http_server.hits("/gone.jpg") == 1

    flaky = http_server.route("/flaky.jpg", [Response(status=500), Response(status=503), Response(body=b"ok")])
    assert fetch(flaky, LOCAL) == b"ok"
    assert http_server.hits("/flaky.jpg") == 3

    broken = http_server.route("/broken.jpg", Response(status=500))
    assert reason_of(broken, FetchOptions(allow_loopback=True, backoff_s=0.01, retries=2)) == "http_500"
    assert http_server.hits("/broken.jpg") == 3


def test_429_waits_for_a_short_retry_after_and_gives_up_on_a_long_one(http_server):
    polite = http_server.route("/busy.jpg", [Response(status=429, headers={"Retry-After": "1"}),
                                             Response(body=b"ok")])
    start = time.monotonic()
    assert fetch(polite, LOCAL) == b"ok"
    assert time.monotonic() - start >= 0.95  # backoff_s is 0.01: only Retry-After explains the wait

    rude = http_server.route("/later.jpg", Response(status=429, headers={"Retry-After": "3600"}))
    start = time.monotonic()
    with pytest.raises(FetchError) as err:
        fetch(rude, LOCAL)
    assert err.value.reason == "http_429" and "3600" in err.value.detail
    assert http_server.hits("/later.jpg") == 1 and time.monotonic() - start < 0.5


def test_slow_server_times_out_after_retries(http_server):
    slow = http_server.route("/slow.jpg", Response(body=b"late", delay_s=1.0))
    options = FetchOptions(allow_loopback=True, timeout_s=0.3, retries=1, backoff_s=0.01)
    start = time.monotonic()
    assert reason_of(slow, options) == "timeout"
    assert http_server.hits("/slow.jpg") == 2
    assert time.monotonic() - start < 1.0


def test_truncated_body_is_retried_then_reported(http_server):
    short = Response(body=b"x" * 100, declared_length=1000)
    once = http_server.route("/once.jpg", [short, Response(body=b"whole")])
    assert fetch(once, LOCAL) == b"whole"

    always = http_server.route("/short.jpg", short)
    assert reason_of(always, FetchOptions(allow_loopback=True, backoff_s=0.01, retries=1)) == "truncated"
    assert http_server.hits("/short.jpg") == 2


def test_oversized_bodies_are_refused_from_content_length_without_reading(http_server):
    options = FetchOptions(allow_loopback=True, max_bytes=1000)
    big = http_server.route("/big.jpg", Response(body=b"x", stream_extra_bytes=50 * 2**20))
    huge = http_server.route("/huge.jpg", Response(body=b"x", declared_length=10**12))
    start = time.monotonic()
    assert reason_of(big, options) == "too_large"
    assert reason_of(huge, options) == "too_large"
    assert time.monotonic() - start < 1.0
    assert http_server.hits("/big.jpg") == 1 and http_server.hits("/huge.jpg") == 1


class EndlessBody:
    """A raw HTTP server: answers `head` (a status line and headers, no Content-Length), then zeros
    until `limit` bytes (the case only a byte bound stops), `chunk` bytes every `pause_s` seconds; the
    head too is sent `chunk` bytes at a time when `drip_head`. Serves every connection it gets."""

    HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nConnection: close\r\n\r\n"

    def __init__(self, limit: int, chunk: int = 65536, pause_s: float = 0.0, drip_head: bool = False) -> None:
        self.limit, self.chunk, self.pause_s, self.drip_head = limit, chunk, pause_s, drip_head
        self.sent, self.request, self.connections = 0, b"", 0
        self.answered = threading.Event()  # set when the first answer ends
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/endless.jpg"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(30)
        try:
            while True:
                conn, _ = self.sock.accept()
                self.connections += 1
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()
        except OSError:  # closed, or nobody came back
            pass

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            while b"\r\n\r\n" not in self.request:
                self.request += conn.recv(4096)
            head = self.HEAD
            try:
                while self.drip_head and head:
                    conn.sendall(head[:self.chunk])
                    head = head[self.chunk:]
                    time.sleep(self.pause_s)
                conn.sendall(head)
                while self.sent < self.limit:
                    conn.sendall(b"\0" * self.chunk)
                    self.sent += self.chunk
                    time.sleep(self.pause_s)
            except OSError:  # the client hung up, as it should
                pass
        self.answered.set()

    def close(self) -> None:
        self.sock.close()


def test_stream_without_length_stops_at_max_bytes_and_sends_user_agent():
    server = EndlessBody(limit=200 * 2**20)
    assert reason_of(server.url, FetchOptions(allow_loopback=True, max_bytes=256 * 1024)) == "too_large"
    assert server.answered.wait(timeout=10)
    server.close()
    assert server.sent < 50 * 2**20  # kernel buffers hold a few MB; reading all 200 MB would not stop here
    assert b"\r\nuser-agent: tagbeam/0.1\r\n" in server.request.lower()


@pytest.mark.parametrize("drip_head", [False, True], ids=["body", "status_line_and_headers"])
def test_a_dripping_server_costs_one_deadline_and_is_not_retried(drip_head):
    # Every read is quick (a byte per 0.05 s, under the 2 s read time-out); only the row's deadline stops it.
    server = EndlessBody(limit=10**6, chunk=1, pause_s=0.05, drip_head=drip_head)
    options = FetchOptions(allow_loopback=True, timeout_s=2.0, deadline_s=0.6, retries=3, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(FetchError) as err:
        fetch(server.url, options)
    took = time.monotonic() - start
    server.close()
    assert err.value.reason == "timeout" and "--fetch_deadline_s" in err.value.detail
    assert 0.5 < took < 1.2
    assert server.connections == 1  # a dripping host would drip again: no retry
    if drip_head:
        assert server.sent == 0  # it never got past the head


def test_redirects_are_bounded(http_server):
    final = http_server.serve("/r5", b"arrived")
    for i in range(4, -1, -1):
        http_server.route(f"/r{i}", redirect(http_server.url(f"/r{i + 1}")))
    assert fetch(http_server.url("/r0"), FetchOptions(allow_loopback=True, max_redirects=5)) == b"arrived"
    assert final.endswith("/r5")

    assert reason_of(http_server.url("/r0"), FetchOptions(allow_loopback=True, max_redirects=4)) == "too_many_redirects"
    assert http_server.hits("/r4") == 2 and http_server.hits("/r5") == 1  # the 5th hop was not followed


def test_every_redirect_hop_is_checked(http_server):
    to_metadata = http_server.route("/meta.jpg", redirect("http://169.254.169.254/latest/meta-data"))
    start = time.monotonic()
    assert reason_of(to_metadata) == "blocked_address"
    assert time.monotonic() - start < 0.5  # refused before any connection attempt
    assert http_server.hits("/meta.jpg") == 1  # and not retried

    # 0.0.0.0 reaches this machine's listeners on Linux: prove it does, then that fetch refuses it.
    probe = f"http://0.0.0.0:{http_server.port}"
    http_server.serve("/probe", b"reachable")
    assert urllib.request.urlopen(probe + "/probe", timeout=5).read() == b"reachable"
    http_server.serve("/secret", b"internal")
    sneaky = http_server.route("/sneaky.jpg", redirect(probe + "/secret"))
    assert reason_of(sneaky) == "blocked_address"
    assert http_server.hits("/secret") == 0

    to_file = http_server.route("/file.jpg", redirect("file:///etc/passwd"))
    assert reason_of(to_file) == "blocked_scheme"


def test_blocked_addresses_and_names(http_server):
    url = http_server.serve("/x.jpg", b"x")
    strict = FetchOptions()
    assert reason_of(url, strict) == "blocked_address"
    assert reason_of(url.replace("127.0.0.1", "localhost"), strict) == "blocked_address"
    assert http_server.hits("/x.jpg") == 0
    # Refused by name: without the name check this would be a DNS failure ("dns") here.
    assert reason_of("http://metadata.google.internal/computeMetadata/v1/", LOCAL) == "blocked_address"
    assert reason_of("http://Metadata.Google.Internal./x", LOCAL) == "blocked_address"
    for sneaky in ("http://[::ffff:169.254.169.254]/", "http://2852039166/", "http://[fe80::1]/",
                   "http://224.0.0.1/", "http://0.0.0.0/", "http://[::169.254.169.254]/",
                   "http://[64:ff9b::a9fe:a9fe]/", "http://[2002:a9fe:a9fe::1]/"):
        assert reason_of(sneaky, LOCAL) == "blocked_address", sneaky
    # IPv4-compatible and -mapped forms of the loopback are refused as loopback, not as a failed connection.
    for loopback in ("http://[::127.0.0.1]/x.jpg", "http://[::ffff:127.0.0.1]/x.jpg"):
        with pytest.raises(FetchError, match="a loopback address"):
            fetch(loopback, strict)


def test_schemes_and_local_files(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"top secret")
    for uri in ("file:///etc/passwd", str(secret), secret.as_uri(), "ftp://example.com/a.jpg",
                "data:image/png;base64,iVBORw0KGgo=", "javascript:alert(1)"):
        assert reason_of(uri) == "blocked_scheme", uri
    allowed = FetchOptions(allow_local_files=True)
    assert fetch(str(secret), allowed) == b"top secret"
    assert fetch(secret.as_uri(), allowed) == b"top secret"
    assert reason_of(str(tmp_path / "missing.jpg"), allowed) == "not_found"
    assert reason_of(str(secret), FetchOptions(allow_local_files=True, max_bytes=5)) == "too_large"


def test_relative_paths_resolve_under_base_only(tmp_path):
    images = tmp_path / "manifest" / "posters"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(b"poster")
    (tmp_path / "outside.jpg").write_bytes(b"outside")
    base = str(tmp_path / "manifest")

    assert fetch("posters/a.jpg", FetchOptions(), base) == b"poster"
    assert fetch("./posters/../posters/a.jpg", FetchOptions(), base) == b"poster"
    assert fetch(str(images / "a.jpg"), FetchOptions(), base) == b"poster"  # absolute, but under base
    for escape in ("../outside.jpg", "posters/../../outside.jpg", "..\\outside.jpg", "%2e%2e/outside.jpg"):
        assert reason_of(escape, FetchOptions(), base) == "escapes_base", escape
    assert reason_of(str(tmp_path / "outside.jpg"), FetchOptions(), base) == "blocked_scheme"
    assert reason_of("posters/a.jpg", FetchOptions(), None) == "bad_uri"

    assert resolve_uri("a/b.jpg", "gs://bucket/data/") == "gs://bucket/data/a/b.jpg"
    assert resolve_uri("./b.jpg", "https://img.example.com/root") == "https://img.example.com/root/b.jpg"
    assert resolve_uri("https://x.example/a.jpg", "gs://bucket") == "https://x.example/a.jpg"
    with pytest.raises(FetchError, match="escapes_base"):
        resolve_uri("a/%2E%2E/%2e%2E/etc/passwd", "https://img.example.com/root")


def test_gcs_objects_through_the_emulator(gcs_bucket):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = storage.Client(project="test-project", credentials=AnonymousCredentials()).bucket(gcs_bucket)
    bucket.blob("data/posters/a.jpg").upload_from_string(b"gcs poster")
    bucket.blob("data/big.jpg").upload_from_string(b"y" * 5000)

    assert fetch(f"gs://{gcs_bucket}/data/posters/a.jpg", LOCAL) == b"gcs poster"
    assert fetch("posters/a.jpg", LOCAL, base=f"gs://{gcs_bucket}/data") == b"gcs poster"
    assert reason_of(f"gs://{gcs_bucket}/data/missing.jpg") == "not_found"
    assert reason_of(f"gs://{gcs_bucket}/data/big.jpg", FetchOptions(max_bytes=1000)) == "too_large"
    assert reason_of("../secret.jpg", LOCAL, base=f"gs://{gcs_bucket}/data") == "escapes_base"


def test_fetch_many_overlaps_latency_and_keeps_order(http_server):
    uris = [http_server.route(f"/slow{i}.jpg", Response(body=f"image {i}".encode(), delay_s=0.3))
            for i in range(16)]
    uris[7] = http_server.route("/missing7.jpg", Response(status=404, delay_s=0.3))
    start = time.monotonic()
    results = fetch_many(uris, LOCAL)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"16 x 0.3 s fetches took {elapsed:.2f} s: not concurrent"
    assert [r.data for i, r in enumerate(results) if i != 7] == [f"image {i}".encode() for i in range(16) if i != 7]
    assert isinstance(results[7], FetchError) and results[7].reason == "http_404"
    assert fetch_many([], LOCAL) == []


def test_fetch_error_pickles_with_all_fields():
    err = pickle.loads(pickle.dumps(FetchError("http_503", "busy", retryable=True, retry_after_s=2.0)))
    assert (err.reason, err.detail, err.retryable, err.retry_after_s) == ("http_503", "busy", True, 2.0)
    assert pickle.loads(pickle.dumps(LOCAL)) == LOCAL


def _self_signed_localhost(tmp_path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_https_connects_to_the_checked_address_but_verifies_the_name(tmp_path, monkeypatch):
    cert, key = _self_signed_localhost(tmp_path)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"tls for {self.headers['Host']}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        options = FetchOptions(allow_loopback=True, retries=0)
        # Untrusted certificate: verification is on.
        assert reason_of(f"https://localhost:{port}/a.jpg", options) == "tls"
        # Trusted, and the certificate names "localhost" while the socket goes to 127.0.0.1.
        monkeypatch.setenv("SSL_CERT_FILE", cert)
        assert fetch(f"https://localhost:{port}/a.jpg", options) == f"tls for localhost:{port}".encode()
        # The same server by IP: the name no longer matches the certificate.
        assert reason_of(f"https://127.0.0.1:{port}/a.jpg", options) == "tls"
    finally:
        server.shutdown()
        server.server_close()


def test_local_reads_stay_in_the_folder_and_read_only_regular_files(tmp_path):
    base = tmp_path / "manifest"
    (base / "images").mkdir(parents=True)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"outside")
    (base / "images" / "link.jpg").symlink_to(secret)
    (base / "images" / "inside.jpg").write_bytes(b"inside")
    (base / "images" / "alias.jpg").symlink_to(base / "images" / "inside.jpg")
    assert fetch("images/alias.jpg", FetchOptions(), str(base)) == b"inside"  # a link that stays inside
    assert reason_of("images/link.jpg", FetchOptions(), str(base)) == "escapes_base"
    assert fetch("images/link.jpg", FetchOptions(allow_local_files=True), str(base)) == b"outside"
    fifo = base / "images" / "pipe.jpg"
    os.mkfifo(fifo)
    start = time.monotonic()
    assert reason_of("images/pipe.jpg", FetchOptions(), str(base)) == "not_a_file"
    assert reason_of("/dev/stdin", FetchOptions(allow_local_files=True)) == "not_a_file"
    assert time.monotonic() - start < 5  # refused, not blocked waiting for a writer


def test_gs_rows_without_credentials_are_rejected_saying_what_to_do(tmp_path, monkeypatch):
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud login here
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # nor a metadata server to ask
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    results = fetch_many(["gs://bucket/a.jpg", "gs://bucket/b.jpg"], LOCAL)
    assert [r.reason for r in results] == ["no_credentials", "no_credentials"]
    assert results[0] is results[1]  # looked for once, not once per row
    assert "GOOGLE_APPLICATION_CREDENTIALS" in results[0].detail
