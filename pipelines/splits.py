"""Stable train/val/test assignment by a hash of the row id.

A row's split depends on its id alone, so reruns, retries and different workers agree, and
growing a manifest never moves an existing row to another split (no leakage across versions).
"""
from __future__ import annotations

import hashlib

_SALT = b"tagbeam-split:"


def unit_hash(id_: str, salt: bytes = _SALT) -> float:
    """A uniform number in [0, 1) from the first 8 bytes of SHA-256(salt + id)."""
    return int.from_bytes(hashlib.sha256(salt + id_.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(id_: str, val_fraction: float, test_fraction: float) -> str:
    h = unit_hash(id_)
    if h < test_fraction:
        return "test"
    if h < test_fraction + val_fraction:
        return "val"
    return "train"
