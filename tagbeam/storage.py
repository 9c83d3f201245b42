"""Paths and small files, local or on any Beam file system (gs://, GCS emulators).

Everything goes through Beam's FileSystems, so local folders, gs:// and the GCS emulator behave
alike (tf.io.gfile cannot reach an emulator). Beam is imported lazily: --help and flag errors do
not wait for it.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

TEMP_MARK = ".tmp-"  # `<name>.tmp-<uuid>`: a writer's file that is not in place yet


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
