"""Paths and small files, local or on any Beam file system (gs://, GCS emulators).

Everything goes through Beam's FileSystems, so local folders, gs:// and the GCS emulator behave
alike (tf.io.gfile cannot reach an emulator). Beam is imported lazily: --help and flag errors do
not wait for it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import uuid
from typing import Any

TEMP_MARK = ".tmp-"  # `<name>.tmp-<uuid>`: a writer's file that is not in place yet
ABSENT = "0"  # the version of a file that does not exist (GCS's `if_generation_match=0`)
APPEND_DEADLINE_S = 120.0  # concurrent appenders on gs:// retry this long before giving up


def is_remote(path: str) -> bool:
    return "://" in path


def join(folder: str, *names: str) -> str:
    """`folder/name/...` for local paths and URLs alike (no os.sep games on URLs)."""
    path = folder
    for name in names:
        path = f"{path.rstrip('/')}/{name}"
    return path


def _fs():
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def exists(path: str) -> bool:
    return _fs().exists(path)


def read_bytes(path: str) -> bytes:
    with _fs().open(path) as handle:
        return handle.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def read_json_if_exists(path: str) -> Any | None:
    return read_json(path) if exists(path) else None


class BadFile(ValueError):
    """A state file that cannot be used as it is: the message names it, what is wrong and what to do."""


def read_state_json(path: str, fix: str, required: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """A JSON object file that a program wrote and people may have edited or cut short; None if it
    does not exist. Raises BadFile (naming the file, the fault and `fix`) if it is not a JSON object
    with the `required` keys."""
    return parse_state_json(path, read_bytes(path), fix, required) if exists(path) else None


def parse_state_json(path: str, data: bytes, fix: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """read_state_json of content already read (e.g. with its version)."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise BadFile(f"{path} is not valid JSON ({err}): {fix}") from None
    if not isinstance(meta, dict):
        raise BadFile(f"{path} holds a JSON {type(meta).__name__}, not an object: {fix}")
    missing = [key for key in required if key not in meta]
    if missing:
        raise BadFile(f"{path} lacks {', '.join(missing)}: {fix}")
    return meta


def set_aside(path: str) -> str:
    """Renames a bad file to `<path>.bad-<UTC time>` (kept for a post-mortem, out of every reader's
    way) and returns the new name."""
    import datetime as dt

    target = f"{path}.bad-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%S%fZ')}"
    if is_remote(path):
        _fs().rename([path], [target])
    else:
        os.replace(path, target)
    return target


def temp_name(path: str) -> str:
    return f"{path}{TEMP_MARK}{uuid.uuid4().hex}"


def write_bytes(path: str, data: bytes) -> str:
    """Writes a file whole, so that a reader sees the old content or the new, never a part.

    Local: a sibling temporary file, fsync'd and renamed over (atomic on POSIX). Elsewhere: a
    temporary object renamed into place (on GCS one finished object upload is atomic already, and
    the rename keeps a killed writer from leaving a partial object under the real name).
    """
    tmp = temp_name(path)
    if not is_remote(path):
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        try:
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path
    with _fs().create(tmp) as out:
        out.write(data)
    return move_into_place(tmp, path)


def move_into_place(tmp: str, path: str) -> str:
    """Renames a finished temporary file (`temp_name(path)`) over `path`."""
    fs = _fs()
    if fs.exists(path):
        fs.delete([path])
    fs.rename([tmp], [path])
    return path


def write_text(path: str, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any, *, sort_keys: bool = False) -> str:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def match(pattern: str) -> list[str]:
    """Paths matching a glob; [] when nothing (or not even the folder) exists."""
    try:
        return [m.path for m in _fs().match([pattern])[0].metadata_list]
    except Exception:  # noqa: BLE001 - BeamIOError when the folder itself does not exist
        return []


def makedirs(path: str) -> None:
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)  # object stores have no folders to make


def remove_tree(folder: str) -> None:
    """Deletes a folder and everything in it, if it exists."""
    if not is_remote(folder):
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    elif match(join(folder, "**")):
        _fs().delete([folder.rstrip("/") + "/"])


# --- files several processes write at once -----------------------------------------------------
# Beam's FileSystems has no preconditions, so these go through google-cloud-storage on gs://
# (object generations) and through O_EXCL / O_APPEND on local disks.

_client_lock = threading.Lock()
_clients: dict[tuple[int, str | None], Any] = {}


def gcs_client() -> Any:
    """One google-cloud-storage client per process (and per emulator setting, for tests). Raises
    google.auth.exceptions.DefaultCredentialsError when there are no credentials."""
    from google.cloud import storage

    key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
    with _client_lock:
        if key not in _clients:
            if key[1]:
                from google.auth.credentials import AnonymousCredentials

                _clients[key] = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator"),
                                               credentials=AnonymousCredentials())
            else:
                _clients[key] = storage.Client()
        return _clients[key]


def _blob(path: str) -> Any:
    if not path.startswith("gs://"):
        raise ValueError(f"{path}: only local paths and gs:// support versioned writes")
    bucket, _, name = path[len("gs://"):].partition("/")
    return gcs_client().bucket(bucket).blob(name)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_versioned(path: str) -> tuple[bytes | None, str]:
    """(content, version) of a file, or (None, ABSENT). The version is the object generation on
    gs:// and a digest of the content on local disks."""
    if not is_remote(path):
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None, ABSENT
        return data, _digest(data)
    from google.api_core import exceptions as gexc

    while True:
        blob = _blob(path)
        blob = blob.bucket.get_blob(blob.name)
        if blob is None:
            return None, ABSENT
        try:
            # Pinned to the generation just read: content and version belong together.
            generation = blob.generation  # read first: a download may reset it from its response headers
            return blob.download_as_bytes(if_generation_match=generation), str(generation)
        except (gexc.NotFound, gexc.PreconditionFailed):
            continue  # replaced or deleted between the two requests: read again


def write_if_version(path: str, data: bytes, version: str) -> str | None:
    """Writes `path` whole if it still is at `version` (ABSENT: if it does not exist) and returns
    its new version; None if it changed. On gs:// the check is the write's own generation precondition; on a local disk the
    check and the rename are two steps, so local callers hold the workspace lease (tagbeam/lease.py)."""
    if not is_remote(path):
        if read_versioned(path)[1] != version:
            return None
        write_bytes(path, data)
        return _digest(data)
    from google.api_core import exceptions as gexc

    blob = _blob(path)
    try:
        blob.upload_from_string(data, if_generation_match=int(version))
    except gexc.PreconditionFailed:
        return None
    return str(blob.generation)


def create_exclusive(path: str, data: bytes) -> str | None:
    """Creates `path` with `data` unless it exists (O_EXCL; on gs:// `if_generation_match=0`);
    returns its version, or None if it existed."""
    if is_remote(path):
        return write_if_version(path, data, ABSENT)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return _digest(data)


def delete_if_version(path: str, version: str) -> bool:
    """Deletes `path` if it still is at `version`; False if it changed or is gone."""
    if not is_remote(path):
        if read_versioned(path)[1] != version:
            return False
        os.remove(path)
        return True
    from google.api_core import exceptions as gexc

    try:
        _blob(path).delete(if_generation_match=int(version))
    except (gexc.PreconditionFailed, gexc.NotFound):
        return False
    return True


def append_line(path: str, line: str) -> None:
    """Appends one line so that concurrent appenders never interleave or lose one.

    Local: one write(2) of the whole line on an O_APPEND descriptor. gs:// objects cannot be
    appended to: the object is rewritten with a generation precondition, and a writer that lost
    the race reads again and retries (the file is small: one line per run).
    """
    text = line.rstrip("\n") + "\n"
    if not is_remote(path):
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # A writer killed mid-line leaves a half line: keep ours on its own line.
            size = os.fstat(fd).st_size
            if size and _last_byte(path) != b"\n":
                text = "\n" + text
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    deadline = time.monotonic() + APPEND_DEADLINE_S
    while True:
        old, version = read_versioned(path)
        head = old or b""
        if head and not head.endswith(b"\n"):
            head += b"\n"
        if write_if_version(path, head + text.encode("utf-8"), version) is not None:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not append to {path}: other writers kept changing it for "
                               f"{APPEND_DEADLINE_S:.0f} s")
        time.sleep(random.uniform(0.05, 0.5))


def _last_byte(path: str) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)
