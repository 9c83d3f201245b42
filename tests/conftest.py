"""Shared fixtures: a fault-injecting HTTP server, the GCS emulator, and 2 logical CPUs.

Tests touch nothing outside 127.0.0.1: the GCS client is pointed at a local emulator
and anonymous credentials, so no test waits on (or leaks to) Google's auth endpoints.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fault_server import FaultServer  # noqa: E402

# MirroredStrategy on CPU needs the CPU split into logical devices before TensorFlow
# runs its first op, so it happens at collection time, once for the whole session.
CPU_REPLICAS = 2


_LOCAL_HOSTS = {"127.0.0.1", "::1", "localhost", "0.0.0.0", socket.gethostname()}
# Connections and name look-ups this test process tried beyond the machine itself.
OUTBOUND_ATTEMPTS: list[str] = []


def _is_ip_literal(name: str) -> bool:
    # Resolving an IP literal is parsing, not a DNS query; the connect guard judges the address.
    # (inet_aton also takes the numeric forms getaddrinfo does, such as "2852039166".)
    literal = name.strip("[]").split("%")[0]
    try:
        socket.inet_aton(literal)
        return True
    except OSError:
        pass
    try:
        ipaddress.IPv6Address(literal)
        return True
    except ValueError:
        return False


def _guard_network() -> None:
    """Refuses, and records, any connection or DNS look-up beyond this machine: tests must run
    offline against local servers, and a library that phones home (Beam's DirectRunner fetching
    Prism from GitHub, google-auth probing the metadata server) should fail the suite, not slow it.
    Child processes are not covered."""
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock: socket.socket, address: object) -> object:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL_HOSTS:
            OUTBOUND_ATTEMPTS.append(f"connect {address}")
            raise OSError(f"tests may not connect to {address} (only 127.0.0.1)")
        return connect(sock, address)

    def guarded_getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name not in _LOCAL_HOSTS and not _is_ip_literal(name):
            OUTBOUND_ATTEMPTS.append(f"resolve {name}")
            raise socket.gaierror(socket.EAI_NONAME, f"tests may not resolve {name}")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = guarded_connect
    socket.getaddrinfo = guarded_getaddrinfo


@pytest.fixture
def outbound_expected() -> Iterator[list[str]]:
    """For tests of what happens when a remote resource is unreachable: the attempts they make are
    still refused, and handed to the test instead of failing the session."""
    before = len(OUTBOUND_ATTEMPTS)
    seen: list[str] = []
    yield seen
    seen.extend(OUTBOUND_ATTEMPTS[before:])
    del OUTBOUND_ATTEMPTS[before:]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if OUTBOUND_ATTEMPTS:
        print(f"\nerror: the tests tried to reach the network: {sorted(set(OUTBOUND_ATTEMPTS))}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _guard_network()
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    if not tf.config.get_logical_device_configuration(cpus[0]):
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * CPU_REPLICAS
        )


@pytest.fixture
def http_server() -> Iterator[FaultServer]:
    server = FaultServer().start()
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _honour_generation_preconditions() -> None:
    """gcp-storage-emulator ignores `ifGenerationMatch` (checked: it creates over an existing object
    with if_generation_match=0 and deletes with a wrong generation). Real GCS honours it, and the
    workspace lease, champion compare-and-swap and history appends rely on it, so the emulator's
    upload and delete handlers get the check GCS makes: 412 unless the object's current generation
    (0: none) is the one given. Its HTTP server is single-threaded, so check and write are one step."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    if getattr(objects, "_tagbeam_preconditions", False):
        return

    def checked(handler):
        def handle(request, response, storage, *args, **kwargs):
            wanted = request.query.get("ifGenerationMatch")
            if wanted:
                name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
                if name is None and isinstance(request.data, dict):
                    name = request.data.get("meta", {}).get("name")
                try:
                    current = str(storage.get_file_obj(request.params["bucket_name"], name).get("generation"))
                except NotFound:
                    current = "0"
                if current != wanted[0]:
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                    return None
            return handler(request, response, storage, *args, **kwargs)
        return handle

    for original in (objects.insert, objects.delete):
        wrapped = checked(original)
        for _, handlers in server.HANDLERS:
            for method, handler in handlers.items():
                if handler is original:
                    handlers[method] = wrapped
        setattr(objects, original.__name__, wrapped)  # the router's fallback for uploads looks it up here
    objects._tagbeam_preconditions = True


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """Starts gcp-storage-emulator and points google-cloud-storage (and Beam's gcsio) at it.

    Yields the emulator's base URL. Credentials are anonymous: the environment variables
    below make google-auth skip the GCE metadata probe that otherwise costs ~24 s.
    """
    from gcp_storage_emulator.server import create_server

    _honour_generation_preconditions()
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    base = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "NO_GCE_CHECK", "GOOGLE_CLOUD_PROJECT")}
    os.environ["STORAGE_EMULATOR_HOST"] = base
    os.environ["NO_GCE_CHECK"] = "true"
    os.environ["GOOGLE_CLOUD_PROJECT"] = "test-project"
    yield base
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def gcs_bucket(gcs_emulator: str) -> Iterator[str]:
    """A fresh bucket on the emulator; yields its name."""
    import uuid

    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test-project", credentials=AnonymousCredentials())
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    client.create_bucket(name)
    yield name


@pytest.fixture
def emulator_credentials(gcs_emulator, tmp_path, monkeypatch):
    """Beam's GCS client asks google.auth.default() for credentials and, finding none, retries for
    ~24 s before going anonymous; `--no_auth` does not help (in Beam 2.77 only the Dataflow API
    client reads it). Application Default Credentials with an already-valid dummy token make the
    look-up succeed at once without any refresh (a network call); the emulator ignores the token."""
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps({"type": "authorized_user", "client_id": "emulator", "client_secret": "emulator",
                               "refresh_token": "emulator", "token": "emulator", "expiry": "2999-01-01T00:00:00Z"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """One headless Chromium for the session's page tests. Never skipped: without the browser the
    test fails and says how to install it (scripts/setup_env.sh)."""
    from browser import chromium

    with chromium() as driver:
        yield driver
