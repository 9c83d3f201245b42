"""Where a Beam job's workers run, and which paths they can reach: one rule for every entry point
that runs Beam (preprocess, predict, and retrain, which forwards Beam's options to preprocess).

A local folder is only as good as the machine that holds it. The direct runners, and a portable
runner whose job service and SDK workers are on this machine (an embedded or localhost job service,
Flink `[local]`/`[auto]`, Spark `local[...]`, Prism), can use it; Dataflow, a job service or cluster
master on another host, an external worker pool on another host, and SDK workers in Docker
containers (which see none of this machine's folders) cannot. The decision reads Beam's own option
classes and asks Beam's runners which environment they would use, rather than listing runner names.

A path whose scheme Beam has no usable file system for is refused before any work, naming the
schemes that are installed (Beam's FileSystems registry, and whether each one's client library is
installed) and the pip extra that brings the missing one (from apache-beam's own requirements).
"""
from __future__ import annotations

import copy
import importlib.metadata
import ipaddress
import re
import urllib.parse
from collections.abc import Mapping

from apache_beam.options.pipeline_options import (
    FlinkRunnerOptions,
    PipelineOptions,
    PortableOptions,
    SparkRunnerOptions,
    StandardOptions,
)

from pipelines.cli import LOCAL_RUNNER
from pipelines.manifests import ManifestOptions
from tagbeam import storage
from tagbeam.flags import UsageError

# The client library each of Beam's file systems imports beyond apache-beam itself. Beam registers
# the s3:// and azfs:// file systems even without them, and fails only at the first read.
_CLIENTS = {"gs": "google-cloud-storage", "s3": "boto3", "azfs": "azure-storage-blob", "hdfs": "hdfs"}
# What else a scheme needs besides its library, from Beam's own options.
_SETUP = {"hdfs": "and --hdfs_host/--hdfs_port/--hdfs_user (Beam's HadoopFileSystemOptions)"}
# Paths in these schemes are fetched over the web (pipelines/fetch.py), not through Beam's file systems.
_WEB_SCHEMES = ("http", "https")


def _scheme(path: str) -> str:
    return path.split("://", 1)[0].lower() if storage.is_remote(path) else ""


def _registered() -> list[str]:
    """The schemes Beam has a file system class for (the local one has none: plain paths)."""
    import apache_beam.io.filesystems  # noqa: F401 - importing it registers the file systems Beam ships
    from apache_beam.io.filesystem import FileSystem

    return sorted({fs.scheme() for fs in FileSystem.get_all_subclasses() if fs.scheme()})


def _has_client(scheme: str) -> bool:
    client = _CLIENTS.get(scheme)
    if client is None:
        return True
    try:
        importlib.metadata.version(client)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def installed_schemes() -> list[str]:
    """The schemes this machine can read and write through Beam's FileSystems."""
    return [scheme for scheme in _registered() if _has_client(scheme)]


def _beam_extra(distribution: str) -> str:
    """`apache-beam[extra]`, the extra of apache-beam's requirements that brings `distribution`."""
    wanted = distribution.lower().replace("_", "-")
    for requirement in importlib.metadata.requires("apache-beam") or []:
        found = re.match(r"\s*([A-Za-z0-9_.-]+)[^;]*;.*extra\s*==\s*['\"]([\w-]+)['\"]", requirement)
        if found and found[1].lower().replace("_", "-") == wanted:
            return f"apache-beam[{found[2]}]"
    return distribution


def check_scheme(flag: str, path: str) -> None:
    """Raises UsageError unless Beam has a usable file system for `path`."""
    scheme = _scheme(path)
    if not scheme:
        return
    installed = ", ".join(["local paths", *(f"{s}://" for s in installed_schemes())])
    if scheme == "file":
        local = urllib.parse.urlsplit(path)
        raise UsageError(f"{flag} {path}: Beam takes local paths without file:// (its local file system has no "
                         f"scheme); give {urllib.parse.unquote(local.path) or '/'}")
    if scheme not in _registered():
        raise UsageError(f"{flag} {path}: Beam has no file system for {scheme}://; installed here: {installed}")
    if not _has_client(scheme):
        client = _CLIENTS[scheme]
        setup = f" {_SETUP[scheme]}" if scheme in _SETUP else ""
        raise UsageError(f"{flag} {path}: Beam's {scheme}:// file system needs {client}, which is not installed: "
                         f"pip install '{_beam_extra(client)}'{setup} (installed here: {installed})")


def _on_this_machine(address: str) -> bool:
    """Whether a host:port, [v6]:port or URL names this machine (localhost or a loopback address)."""
    host = urllib.parse.urlsplit(address if "://" in address else f"//{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def workers_elsewhere(options: PipelineOptions) -> str | None:
    """Why the job's workers cannot see this machine's folders (the flag that says where they run),
    or None when they run here. Raises UsageError for a --runner Beam does not know."""
    from apache_beam.runners.portability.flink_runner import MAGIC_HOST_NAMES, FlinkRunner
    from apache_beam.runners.portability.portable_runner import PortableRunner
    from apache_beam.runners.portability.spark_runner import LOCAL_MASTER_PATTERN, SparkRunner
    from apache_beam.runners.runner import create_runner
    from apache_beam.transforms.environments import DockerEnvironment, ExternalEnvironment

    name = options.view_as(StandardOptions).runner or LOCAL_RUNNER
    try:
        runner = create_runner(name) if isinstance(name, str) else name
    except Exception as err:  # noqa: BLE001 - ValueError for a typo, ImportError for a runner whose extra is missing
        raise UsageError(f"--runner {name}: {err}") from None
    if any(cls.__name__ == "DataflowRunner" for cls in type(runner).__mro__):
        return f"--runner {name} runs the workers on Google Cloud"
    if not isinstance(runner, PortableRunner):
        return None  # Beam's direct runners: this process and its children
    portable = options.view_as(PortableOptions)
    endpoint = portable.job_endpoint
    if endpoint and endpoint != "embed" and not _on_this_machine(endpoint):
        return f"--job_endpoint {endpoint} is a job service on another machine, whose workers run there"
    if not endpoint and isinstance(runner, FlinkRunner):
        master = options.view_as(FlinkRunnerOptions).flink_master
        if master not in MAGIC_HOST_NAMES and not _on_this_machine(master):
            return f"--flink_master {master} is a Flink cluster on another machine"
    if not endpoint and isinstance(runner, SparkRunner):
        master = options.view_as(SparkRunnerOptions).spark_master_url
        if not re.match(LOCAL_MASTER_PATTERN, master) and not _on_this_machine(master):
            return f"--spark_master_url {master} is a Spark cluster on another machine"
    try:  # the environment the runner would give the SDK workers (it fills in its own default)
        environment = runner.default_environment(copy.deepcopy(options))
    except Exception as err:  # noqa: BLE001 - Beam raises ValueError or KeyError for a malformed environment
        raise UsageError(f"--environment_type {portable.environment_type}: {err}") from None
    if isinstance(environment, DockerEnvironment):
        given = "" if portable.environment_type else f" (the default of --runner {name} here)"
        return (f"--environment_type DOCKER{given} runs the SDK workers in containers, which see none of this "
                "machine's folders (use EXTERNAL, PROCESS or LOOPBACK for workers on this machine)")
    if isinstance(environment, ExternalEnvironment) and not _on_this_machine(environment.url):
        return f"--environment_config {environment.url} is a worker pool on another machine"
    return None


def manifest_paths(manifest: ManifestOptions) -> dict[str, str | None]:
    """The manifest's paths that the workers read (an http(s):// --image_root is fetched, not opened)."""
    web = manifest.image_root and _scheme(manifest.image_root) in _WEB_SCHEMES
    return {"--input": manifest.input, "--image_root": None if web else manifest.image_root}


def check_paths(options: PipelineOptions, workers_read: Mapping[str, str | None],
                read_here: Mapping[str, str | None] | None = None) -> str | None:
    """Checks the paths a job is given, by flag, before any work; raises UsageError for the first
    one Beam cannot use. `workers_read` are read or written by the workers (they must reach them);
    `read_here` only by this process. Returns workers_elsewhere(options)."""
    given = {flag: path for flag, path in {**workers_read, **(read_here or {})}.items() if path}
    for flag, path in given.items():
        check_scheme(flag, path)
    elsewhere = workers_elsewhere(options)
    local = [(flag, path) for flag, path in workers_read.items() if path and not storage.is_remote(path)]
    if elsewhere and local:
        flag, path = local[0]
        raise UsageError(f"{flag} {path} is on this machine, which the job's workers cannot reach: {elsewhere}; "
                         "use a place they share (gs://, or s3://, hdfs://, azfs:// with Beam's extra for it)")
    return elsewhere
