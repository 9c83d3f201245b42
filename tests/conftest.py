"""Shared fixtures: a fault-injecting HTTP server, the GCS emulator, and 2 logical CPUs.

Tests touch nothing outside 127.0.0.1: the GCS client is pointed at a local emulator
and anonymous credentials, so no test waits on (or leaks to) Google's auth endpoints.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fault_server import FaultServer  # noqa: E402

# MirroredStrategy on CPU needs the CPU split into logical devices before TensorFlow
# runs its first op, so it happens at collection time, once for the whole session.
CPU_REPLICAS = 2


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """Starts gcp-storage-emulator and points google-cloud-storage (and Beam's gcsio) at it.

    Yields the emulator's base URL. Credentials are anonymous: the environment variables
    below make google-auth skip the GCE metadata probe that otherwise costs ~24 s.
    """
    from gcp_storage_emulator.server import create_server

    port = _free_port()
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
