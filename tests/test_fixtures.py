"""The shared fixtures do what later tests rely on, against real sockets."""
import http.client
import urllib.error
import urllib.request

import pytest

from fault_server import Response, redirect


def test_fault_server_scripts_responses_in_order(http_server):
    url = http_server.route("/flaky.jpg", [Response(status=500), Response(body=b"ok")])
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=5)
    assert err.value.code == 500
    assert urllib.request.urlopen(url, timeout=5).read() == b"ok"
    assert urllib.request.urlopen(url, timeout=5).read() == b"ok"
    assert http_server.hits("/flaky.jpg") == 3


def test_fault_server_truncates_redirects_and_404s(http_server):
    short = http_server.route("/short", Response(body=b"abc", declared_length=100))
    with pytest.raises(http.client.IncompleteRead):
        urllib.request.urlopen(short, timeout=5).read()
    target = http_server.serve("/target", b"payload")
    hop = http_server.route("/hop", redirect(target))
    assert urllib.request.urlopen(hop, timeout=5).read() == b"payload"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(http_server.url("/missing"), timeout=5)
    assert err.value.code == 404


def test_gcs_emulator_round_trip(gcs_bucket):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test-project", credentials=AnonymousCredentials())
    client.bucket(gcs_bucket).blob("a/b.txt").upload_from_string(b"hello")
    names = [b.name for b in client.list_blobs(gcs_bucket)]
    assert names == ["a/b.txt"]
    assert client.bucket(gcs_bucket).blob("a/b.txt").download_as_bytes() == b"hello"


def test_network_beyond_this_machine_is_refused_and_recorded():
    import socket

    import conftest

    before = len(conftest.OUTBOUND_ATTEMPTS)
    with pytest.raises(OSError):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: never routable
    with pytest.raises(OSError):
        socket.getaddrinfo("example.com", 443)
    assert conftest.OUTBOUND_ATTEMPTS[before:] == ["connect ('192.0.2.1', 80)", "resolve example.com"]
    del conftest.OUTBOUND_ATTEMPTS[before:]  # expected here; any other attempt fails the session


def test_gcs_emulator_honours_generation_preconditions(gcs_bucket):
    # Real GCS does; the workspace lease and champion compare-and-swap rely on it (conftest.py).
    from google.api_core.exceptions import PreconditionFailed
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = storage.Client(project="test-project", credentials=AnonymousCredentials()).bucket(gcs_bucket)
    first = bucket.blob("lease")
    first.upload_from_string(b"one", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        bucket.blob("lease").upload_from_string(b"two", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        bucket.blob("lease").upload_from_string(b"two", if_generation_match=first.generation + 1)
    with pytest.raises(PreconditionFailed):
        bucket.blob("lease").delete(if_generation_match=first.generation + 1)
    assert bucket.blob("lease").download_as_bytes() == b"one"
    bucket.blob("lease").upload_from_string(b"three", if_generation_match=first.generation)
    assert bucket.blob("lease").download_as_bytes() == b"three"
