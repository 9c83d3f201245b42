"""Fetches the bytes behind one image URI, safely enough for URLs that users did not write.

Manifests such as MovieGenre.csv come from the internet, so every URI is treated as hostile:
- schemes: http, https, gs, and local paths only when they are relative to the manifest's folder
  (or `allow_local_files`); `file://`, `ftp:`, `data:`, `javascript:` and the rest are refused;
- addresses: every hop of a redirect chain is resolved and refused if any address is loopback,
  link-local or a cloud metadata endpoint (unless allowed), unspecified, multicast or reserved.
  Private ranges (10/8, 172.16/12, 192.168/16, fc00::/7) are ALLOWED on purpose: corporate image
  servers live there. Run the job in a network that cannot reach what it must not (VPC rules).
- the connection goes to the address that was checked (the IP is pinned; TLS still verifies the
  certificate for the host name), so DNS rebinding between the check and the connect cannot
  redirect a request to a blocked address;
- size and time are bounded: Content-Length over `max_bytes` is refused before reading, the body is
  streamed with a byte bound, every read has a time-out, and each row has one deadline that covers
  everything it costs (connect, status line, headers, body, every redirect, retries and back-off).

Everything here is plain Python that pickles: the urllib3 pool and the GCS client are created
lazily once per process (and re-created after a fork), never pickled.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import email.utils
import http.client
import io
import ipaddress
import os
import posixpath
import random
import socket
import stat
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence

import urllib3
import urllib3.connection
from urllib3.exceptions import (
    ConnectTimeoutError,
    IncompleteRead,
    LocationValueError,
    NewConnectionError,
    ProtocolError,
    SSLError,
)
from urllib3.util import parse_url

from pipelines.options import ACCEPTANCE
from tagbeam import storage
from tagbeam.dataset import unexpected
from tagbeam.flags import at_least, group, option, positive

USER_AGENT = "tagbeam/0.1"

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024
# Upper bound on one back-off sleep, and on a Retry-After we are willing to wait for: a server
# asking for minutes would stall a worker thread, so such rows fail now and can be re-run later.
_MAX_SLEEP_S = 10.0
# A host with many A/AAAA records is tried on its first few addresses only.
_MAX_ADDRESSES = 4

# Names that reach instance metadata (credentials!) on GCP, AWS and others; refused before any DNS
# look-up. Their addresses are link-local too, except the ones listed below.
_METADATA_NAMES = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog",
    "instance-data", "instance-data.ec2.internal",
})
_METADATA_ADDRESSES = frozenset({
    ipaddress.ip_address("169.254.169.254"),  # GCP, AWS, Azure, OCI (also link-local)
    ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6 (a private ULA address)
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud (shared address space)
})
# "This network": Linux connects 0.x.x.x to the local host.
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


@group
class FetchOptions:
    """Fetching images (URLs nobody on your team wrote)."""

    timeout_s: float = option(10.0, flag="fetch_timeout_s", check=positive, help="connect and per-read time-out")
    # One budget per row rather than per read or per attempt: a server dripping a byte a second passes
    # every per-read time-out, and retrying it would only buy another drip.
    deadline_s: float = option(120.0, flag="fetch_deadline_s", check=positive,
                               help="time budget of one image: connect, status line, headers, body, redirects, "
                                    "retries and back-off all count; a row over it is rejected as a time-out")
    max_bytes: int = option(20 * 2**20, flag="max_download_bytes", check=positive, tags=[ACCEPTANCE],
                            help="bound on a body (streamed; reading stops beyond it)")
    max_redirects: int = option(5, check=at_least(0), tags=[ACCEPTANCE], help="redirects followed, each hop re-checked")
    retries: int = option(3, flag="fetch_retries", check=at_least(0),
                          help="retries on 5xx, 429, time-outs, resets and truncation; never on other 4xx")
    backoff_s: float = option(0.5, flag="fetch_backoff_s", check=at_least(0),
                              help="first retry back-off, doubled per retry with jitter, capped")
    concurrency: int = option(16, flag="fetch_concurrency", check=positive, help="parallel downloads per worker thread")
    allow_loopback: bool = option(False, tags=[ACCEPTANCE], help="allow image URLs on 127.0.0.0/8 and ::1")
    allow_link_local: bool = option(False, tags=[ACCEPTANCE], help="allow link-local addresses and cloud metadata endpoints (dangerous)")
    allow_local_files: bool = option(False, tags=[ACCEPTANCE], help="allow absolute local paths and file:// URIs outside the manifest's "
                                                 "folder")


class FetchError(Exception):
    """A per-row fetch failure: `reason` is a short token for counters, `detail` is for people."""

    def __init__(self, reason: str, detail: str, retryable: bool = False,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retryable = retryable
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # keeps every field through pickling (Beam ships these between workers)
        return type(self), (self.reason, self.detail, self.retryable, self.retry_after_s)


Validators = dict[str, str | int]


@dataclasses.dataclass(frozen=True)
class Fetched:
    """What one fetch gave: the bytes, or None when the source is unchanged since the `known` validators
    a conditional fetch was given; and the validators that will tell next time whether it changed
    (http: ETag / Last-Modified as the server sent them; gs: object generation and MD5; local: size
    and modification time in ns)."""

    data: bytes | None
    validators: Validators


def resolve_uri(uri: str, base: str | None) -> str:
    """Returns `uri` made absolute: relative paths are joined to `base` (a local folder, gs:// or
    http(s):// prefix). A relative path that climbs out of `base` with '..' is refused.

    URIs with a scheme and absolute paths are returned unchanged; whether they may be read is
    `fetch`'s decision. A relative name containing ':' must be written './name:x.jpg'.
    """
    text = uri.strip()
    if not text:
        raise FetchError("bad_uri", "empty image URI")
    if _scheme(text) or text.startswith("/"):
        return text
    if base is None:
        raise FetchError("bad_uri", f"relative image path {text!r} but no base folder to resolve it "
                                    "against; give absolute URIs or the manifest's/image root folder")
    # Checked on the decoded form with both separators, as a web server or gs tool would see it.
    seen = posixpath.normpath(urllib.parse.unquote(text).replace("\\", "/"))
    if seen == ".." or seen.startswith("../"):
        raise FetchError("escapes_base", f"relative image path {text!r} climbs out of {base!r} "
                                         "with '..'; only files under the base folder may be read")
    relative = posixpath.normpath(text)
    if _scheme(base):
        return base.rstrip("/") + "/" + relative
    return os.path.join(os.path.abspath(base), relative)


def _scheme(uri: str) -> str:
    """The URI's scheme, lower-case; "" for a path. A URI urllib cannot parse (unbalanced IPv6
    brackets, ...) is a bad URI of its row, not an error of the job."""
    try:
        return urllib.parse.urlsplit(uri).scheme.lower()
    except ValueError as err:
        raise FetchError("bad_uri", f"{uri[:200]!r} is not a valid URI: {err}") from None


def fetch(uri: str, options: FetchOptions, base: str | None = None) -> bytes:
    """Returns the bytes behind `uri` (resolved against `base` first), retrying transient faults.

    Local files are read when they lie under a local `base`, symlinks resolved (a link inside the
    manifest's folder may not lead out of it: whoever wrote the manifest may have made the links
    too), or anywhere when `options.allow_local_files` is set; only regular files. Raises FetchError.
    """
    data = fetch_source(uri, options, base).data
    assert data is not None  # only a conditional fetch finds a source unchanged
    return data


def fetch_source(uri: str, options: FetchOptions, base: str | None = None, known: Validators | None = None
                 ) -> Fetched:
    """`fetch`, with the source's validators; given the `known` validators of an earlier fetch, a
    conditional one: data None when the source is unchanged (an HTTP 304, the same gs:// generation,
    the same local size and mtime), without transferring the body. Raises FetchError."""
    deadline = time.monotonic() + options.deadline_s
    try:
        resolved = resolve_uri(uri, base)
        read = _reader(resolved, base, options)
        attempt = 0
        with _row_deadline(deadline):
            while True:
                try:
                    return read(known or None)
                except FetchError as err:
                    left = deadline - time.monotonic()
                    if left <= 0 and err.retryable:  # a lasting failure keeps its own reason
                        raise FetchError("timeout", f"{resolved[:200]} took longer than the row's budget of "
                                                    f"{options.deadline_s:g} s (--fetch_deadline_s); last: "
                                                    f"{err.detail}") from None
                    sleep_s = _backoff_s(attempt, options, err.retry_after_s)
                    if not err.retryable or attempt >= options.retries or sleep_s >= left:
                        raise
                    time.sleep(sleep_s)
                    attempt += 1
    except FetchError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever a URI, a redirect or a server holds, it costs one row
        reason, detail = unexpected(err)
        raise FetchError("bad_uri" if isinstance(err, ValueError) else reason, f"{uri[:200]!r}: {detail}") from None


# The deadline of the row the current thread is fetching; read by _DeadlineReader, which http.client
# creates where no argument of ours reaches (one row is fetched by one thread from start to end).
_deadline_of_thread = threading.local()


@contextlib.contextmanager
def _row_deadline(deadline: float):
    _deadline_of_thread.value = deadline
    try:
        yield
    finally:
        _deadline_of_thread.value = None


def _left_s() -> float | None:
    """Seconds left of the current row's deadline, or None outside a fetch."""
    deadline = getattr(_deadline_of_thread, "value", None)
    return None if deadline is None else deadline - time.monotonic()


def fetch_many(uris: Sequence[str], options: FetchOptions, base: str | None = None,
               known: Sequence[Validators | None] | None = None) -> list[Fetched | FetchError]:
    """`fetch_source` of each URI (with its `known` validators, if given), network ones concurrently on
    threads so that their latency overlaps; keeps input order. Each failure is returned in its row's
    place as a FetchError rather than raised."""
    known = known if known is not None else [None] * len(uris)

    def one(i: int) -> Fetched | FetchError:
        try:
            return fetch_source(uris[i], options, base, known[i])
        except FetchError as err:
            return err

    # Only network reads overlap usefully; local files are read inline, which saves the thread
    # hand-offs that otherwise cost more than the read itself (benchmarks/README.md).
    results: list[Fetched | FetchError] = [None] * len(uris)  # type: ignore[list-item]
    remote = [i for i, uri in enumerate(uris) if _is_network(uri)]
    remote_set = set(remote)
    for i in range(len(uris)):
        if i not in remote_set:
            results[i] = one(i)
    if remote:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(options.concurrency, len(remote))) as pool:
            for i, result in zip(remote, pool.map(one, remote), strict=True):
                results[i] = result
    return results


def _is_network(uri: str) -> bool:
    try:
        return _scheme(uri) in ("http", "https", "gs")
    except FetchError:
        return False  # fetched inline, where it becomes its row's rejection


def _reader(resolved: str, base: str | None, options: FetchOptions) -> Callable[[Validators | None], Fetched]:
    scheme = _scheme(resolved)
    if scheme in ("http", "https"):
        return lambda known: _get_http(resolved, options, known)
    if scheme == "gs":
        return lambda known: _get_gcs(resolved, options, known)
    if scheme == "file" and options.allow_local_files:
        parts = urllib.parse.urlsplit(resolved)
        if parts.netloc in ("", "localhost"):
            return lambda known: _read_local(urllib.request.url2pathname(parts.path), options, known)
    if not scheme and (options.allow_local_files or _is_under_local_base(resolved, base)):
        return lambda known: _read_local(resolved, options, known)
    what = f"scheme {scheme!r}" if scheme else "an absolute local path"
    raise FetchError("blocked_scheme", f"{resolved!r} uses {what}, which is not allowed; use http(s):// "
                                       "or gs://, paths relative to the manifest, or enable allow_local_files")


def _is_under_local_base(path: str, base: str | None) -> bool:
    """Whether `path` is a file under the local folder `base`, symlinks resolved: a link inside the
    manifest's folder may not lead outside it (unless allow_local_files, which skips this check)."""
    if base is None or _scheme(base):
        return False
    if not os.path.normpath(path).startswith(os.path.normpath(os.path.abspath(base)).rstrip(os.sep) + os.sep):
        return False
    real = os.path.realpath(path)
    if not real.startswith(os.path.realpath(os.path.abspath(base)).rstrip(os.sep) + os.sep):
        raise FetchError("escapes_base", f"{path} is a link to {real}, outside {base!r}; only files under the "
                                         "base folder may be read (or enable allow_local_files)")
    return True


def _backoff_s(attempt: int, options: FetchOptions, retry_after_s: float | None) -> float:
    if retry_after_s is not None:
        return retry_after_s
    # "Equal jitter": at least half the exponential step, so retries neither bunch nor collapse.
    step = min(_MAX_SLEEP_S, options.backoff_s * 2**attempt)
    return step / 2 + random.uniform(0, step / 2)


# --- local files -----------------------------------------------------------------------------

def _read_local(path: str, options: FetchOptions, known: Validators | None) -> Fetched:
    try:
        status = os.stat(path)
        # Only regular files: opening a FIFO (or /dev/stdin) would block the worker with no deadline.
        if not stat.S_ISREG(status.st_mode):
            raise FetchError("not_a_file", f"{path} is not a regular file (a FIFO, device or folder); only "
                                           "image files are read")
        validators: Validators = {"mtime_ns": status.st_mtime_ns, "size": status.st_size}
        if known == validators:
            return Fetched(None, validators)
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > options.max_bytes:
                raise _too_large(path, options)
            data = f.read(options.max_bytes + 1)  # a device or growing file has no honest size
    except FileNotFoundError:
        raise FetchError("not_found", f"no such file: {path}") from None
    except OSError as err:
        raise FetchError("io_error", f"cannot read {path}: {err}") from None
    if len(data) > options.max_bytes:
        raise _too_large(path, options)
    return Fetched(data, validators)


def _too_large(where: str, options: FetchOptions, size: int | None = None) -> FetchError:
    size_text = f"is {size} bytes" if size is not None else "goes on"
    return FetchError("too_large", f"{where} {size_text}, over the limit of {options.max_bytes} bytes "
                                   "(raise the image size limit if such images are expected)")


# --- http(s) ---------------------------------------------------------------------------------

class _DeadlineReader(io.RawIOBase):
    """The socket as http.client reads it, each read waiting at most what is left of the row's deadline,
    so a server dripping its status line, headers or body a byte at a time cannot stretch a row past it
    (the socket's own time-out restarts with every byte)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self._read_timeout = sock.gettimeout()  # urllib3 sets the read time-out just before this
        self._io = sock.makefile("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = _left_s()
        if left is not None:
            if left <= 0:
                raise TimeoutError("the row's fetch deadline passed")
            self._sock.settimeout(left if self._read_timeout is None else min(self._read_timeout, left))
        return self._io.readinto(buffer)

    def close(self) -> None:
        self._io.close()
        super().close()


class _DeadlineSocket:
    """What http.client.HTTPResponse is given instead of the socket: it only calls makefile."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        assert mode == "rb", mode
        return io.BufferedReader(_DeadlineReader(self._sock))


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args, **kwargs) -> None:
        super().__init__(_DeadlineSocket(sock), *args, **kwargs)


class _HTTPConnection(urllib3.connection.HTTPConnection):
    response_class = _DeadlineResponse


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    response_class = _DeadlineResponse


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_pool_lock = threading.Lock()
_pool: urllib3.PoolManager | None = None
_pool_pid = -1


def _http() -> urllib3.PoolManager:
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():  # a forked child must not share sockets
            # maxsize above fetch_many's default width, so parallel fetches from one host reuse
            # their connections instead of discarding them.
            _pool = urllib3.PoolManager(num_pools=64, maxsize=32, retries=False)
            _pool.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
            _pool_pid = os.getpid()
        return _pool


@dataclasses.dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str  # as in the URL: lower-case, IDNA-encoded, IPv6 in brackets
    port: int
    request_uri: str
    addresses: tuple[str, ...]


def _get_http(url: str, options: FetchOptions, known: Validators | None) -> Fetched:
    """One attempt: follows redirects by hand so that every hop is checked like the first."""
    conditions = {}
    if known and "etag" in known:
        conditions["If-None-Match"] = str(known["etag"])
    if known and "last_modified" in known:
        conditions["If-Modified-Since"] = str(known["last_modified"])
    for _ in range(options.max_redirects + 1):
        target = _check_target(url, options)
        response = _send(target, options, conditions)
        complete = False
        try:
            if response.status in _REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    raise FetchError(f"http_{response.status}", f"redirect without Location from {url}")
                url = urllib.parse.urljoin(url, location)
                continue
            validators = {key: response.headers[header] for key, header in _HTTP_VALIDATORS
                          if response.headers.get(header)}
            if response.status == 304 and conditions:
                complete = True  # no body: the connection can be kept
                return Fetched(None, validators or dict(known or {}))
            if not 200 <= response.status < 300:
                raise _status_error(response, url)
            body = _read_body(response, url, options)
            complete = True
            return Fetched(body, validators)
        except (ProtocolError, urllib3.exceptions.TimeoutError, SSLError) as err:
            raise _network_error(err, url) from None
        finally:
            if not complete:
                # Unread bytes would poison a kept-alive connection: close it instead.
                response.close()
            response.release_conn()
    raise FetchError("too_many_redirects", f"more than {options.max_redirects} redirects, last to {url}")


_HTTP_VALIDATORS = (("etag", "ETag"), ("last_modified", "Last-Modified"))


def _check_target(url: str, options: FetchOptions) -> _Target:
    try:
        parsed = parse_url(url)
    except LocationValueError as err:
        raise FetchError("bad_uri", f"cannot parse URL {url!r}: {err}") from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in ("http", "https"):
        raise FetchError("blocked_scheme", f"redirect to {url!r}: only http and https may be followed")
    if not parsed.host:
        raise FetchError("bad_uri", f"URL without a host: {url!r}")
    port = parsed.port or (443 if scheme == "https" else 80)
    addresses = _allowed_addresses(parsed.host, port, options)
    return _Target(url, scheme, parsed.host, port, parsed.request_uri, addresses)


def _allowed_addresses(host: str, port: int, options: FetchOptions) -> tuple[str, ...]:
    name = host.strip("[]").rstrip(".")
    if name in _METADATA_NAMES and not options.allow_link_local:
        raise FetchError("blocked_address", f"{host} is a cloud metadata endpoint")
    if (name == "localhost" or name.endswith(".localhost")) and not options.allow_loopback:
        raise FetchError("blocked_address", f"{host} is the local host")
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        transient = isinstance(err, socket.gaierror) and err.errno == socket.EAI_AGAIN
        raise FetchError("dns", f"cannot resolve {host}: {err}", retryable=transient) from None
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:  # all, not just the first: the connection may use any of them
        why = _blocked_because(ipaddress.ip_address(address), options)
        if why:
            shown = host if host.strip("[]") == address else f"{host} resolves to {address},"
            raise FetchError("blocked_address", f"{shown} {why}")
    return addresses[:_MAX_ADDRESSES]


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries and reaches: IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible
    (::a.b.c.d, deprecated but still routed to the IPv4 host by some stacks), NAT64 (64:ff9b::/96)
    and 6to4 (2002::/16)."""
    if ip.ipv4_mapped or ip.sixtofour:
        return ip.ipv4_mapped or ip.sixtofour
    if ip in _NAT64 or 1 < int(ip) < 2**32:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _blocked_because(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, options: FetchOptions) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and _embedded_ipv4(ip):
        ip = _embedded_ipv4(ip)
    if ip.is_loopback:
        return None if options.allow_loopback else "a loopback address"
    if ip.is_link_local or ip in _METADATA_ADDRESSES:
        return None if options.allow_link_local else "a link-local or cloud metadata address"
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip.is_reserved:
        return "a reserved address"
    return None


def _send(target: _Target, options: FetchOptions, conditions: dict[str, str]) -> urllib3.BaseHTTPResponse:
    """Sends the GET to the checked addresses in turn (the first that accepts a connection wins)."""
    default_port = 443 if target.scheme == "https" else 80
    host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
    headers = {"Host": host_header, "User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.8",
               "Accept-Encoding": "identity", **conditions}
    tls = None
    if target.scheme == "https":
        # SNI and certificate checks use the name, while the socket goes to the pinned address.
        name = target.host.strip("[]")
        tls = {"server_hostname": name, "assert_hostname": name}
    left = _left_s()
    if left is not None and left <= 0:
        raise FetchError("timeout", f"no time left of the row's budget to request {target.url}")
    wait = options.timeout_s if left is None else min(options.timeout_s, left)
    timeout = urllib3.Timeout(connect=wait, read=wait)
    failure: Exception | None = None
    for address in target.addresses:
        pool = _http().connection_from_host(address, target.port, target.scheme, pool_kwargs=tls)
        try:
            return pool.urlopen("GET", target.request_uri, headers=headers, redirect=False,
                                retries=False, preload_content=False, timeout=timeout,
                                assert_same_host=False)
        except ConnectTimeoutError as err:  # includes refused connections: try the next address
            failure = err
        except (ProtocolError, urllib3.exceptions.TimeoutError, SSLError) as err:
            raise _network_error(err, target.url) from None
    assert failure is not None
    raise _network_error(failure, target.url)


def _network_error(err: Exception, url: str) -> FetchError:
    if isinstance(err, SSLError):
        return FetchError("tls", f"TLS failure for {url}: {err}")
    if isinstance(err, ProtocolError) and any(isinstance(a, IncompleteRead) for a in err.args):
        return FetchError("truncated", f"connection closed before the whole body of {url}: {err}",
                          retryable=True)
    if isinstance(err, (ProtocolError, NewConnectionError)):
        return FetchError("connection", f"connection failed for {url}: {err}", retryable=True)
    return FetchError("timeout", f"no answer within the time-out from {url}: {err}", retryable=True)


def _status_error(response: urllib3.BaseHTTPResponse, url: str) -> FetchError:
    status = response.status
    detail = f"HTTP {status}{' ' + response.reason if response.reason else ''} from {url}"
    if status != 429 and status < 500:
        return FetchError(f"http_{status}", detail)
    wait = _retry_after_s(response.headers.get("Retry-After"))
    if wait is not None and wait > _MAX_SLEEP_S:
        return FetchError(f"http_{status}", f"{detail}; server asks to retry after {wait:.0f} s, "
                                            "longer than a worker should wait")
    return FetchError(f"http_{status}", detail, retryable=True, retry_after_s=wait)


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _read_body(response: urllib3.BaseHTTPResponse, url: str, options: FetchOptions) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > options.max_bytes:
        raise _too_large(url, options, int(declared))
    chunks: list[bytes] = []
    size = 0
    while chunk := response.read1(_CHUNK_BYTES):
        chunks.append(chunk)
        size += len(chunk)
        if size > options.max_bytes:
            raise _too_large(url, options)
    # urllib3 enforces Content-Length itself; this guards the case where it does not raise.
    if declared.isdigit() and size < int(declared):
        raise FetchError("truncated", f"{url}: got {size} of {declared} bytes", retryable=True)
    return b"".join(chunks)


# --- gs:// -----------------------------------------------------------------------------------

_gcs_lock = threading.Lock()
# Remembered per process and emulator setting: looking for credentials probes the metadata server,
# which must not happen again for every gs:// row of a job that has none.
_gcs_errors: dict[tuple[int, str | None], FetchError] = {}


def _gcs():
    """The process's google-cloud-storage client (tagbeam/storage.py), or the FetchError of having none."""
    import google.auth.exceptions

    key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
    with _gcs_lock:
        if key not in _gcs_errors:
            try:
                return storage.gcs_client()
            except google.auth.exceptions.DefaultCredentialsError as err:
                _gcs_errors[key] = FetchError(
                    "no_credentials", f"no Google credentials to read gs:// images ({err}); run `gcloud auth "
                                      "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS to a "
                                      "service account that can read the bucket")
        raise _gcs_errors[key]


def _get_gcs(uri: str, options: FetchOptions, known: Validators | None) -> Fetched:
    import requests
    from google.api_core import exceptions as gexc
    from google.resumable_media import DataCorruption

    bucket_name, _, name = uri[len("gs://"):].partition("/")
    if not bucket_name or not name:
        raise FetchError("bad_uri", f"{uri!r} is not gs://bucket/object")
    try:
        # retry=None: the one retry policy is fetch()'s, the same for every scheme.
        left = _left_s()
        timeout = options.timeout_s if left is None else max(0.001, min(options.timeout_s, left))
        blob = _gcs().bucket(bucket_name).get_blob(name, timeout=timeout, retry=None)
        if blob is None:
            raise FetchError("not_found", f"no such object: {uri}")
        # A generation names one immutable content of the object: the same one is the same bytes.
        validators: Validators = {"generation": str(blob.generation)}
        if blob.md5_hash:
            validators["md5"] = blob.md5_hash
        if known and known.get("generation") == validators["generation"]:
            return Fetched(None, validators)
        if blob.size is not None and blob.size > options.max_bytes:
            raise _too_large(uri, options, blob.size)
        # Pinned to the generation whose size was checked: a replaced object fails with 412 (retried).
        return Fetched(blob.download_as_bytes(timeout=timeout, retry=None, if_generation_match=blob.generation),
                       validators)
    except gexc.NotFound:
        raise FetchError("not_found", f"no such object: {uri}") from None
    except gexc.GoogleAPICallError as err:
        code = int(err.code or 0)
        transient = code in (408, 412, 429) or code >= 500
        raise FetchError(f"http_{code}", f"GCS error for {uri}: {err.message}", retryable=transient) from None
    except DataCorruption as err:
        raise FetchError("truncated", f"checksum mismatch downloading {uri}: {err}", retryable=True) from None
    except requests.exceptions.Timeout as err:
        raise FetchError("timeout", f"no answer within the time-out from GCS for {uri}: {err}",
                         retryable=True) from None
    except requests.exceptions.ConnectionError as err:
        raise FetchError("connection", f"connection to GCS failed for {uri}: {err}", retryable=True) from None

