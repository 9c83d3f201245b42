"""`tensorflow_hub`, importable with any setuptools: `from trainer.hub import hub`.

tensorflow-hub 0.16.1 (the newest release) checks the TensorFlow version when it is imported, with
`pkg_resources.parse_version` - its only use of pkg_resources. setuptools 81 and later ship no
pkg_resources, so in a virtualenv where `pip install --upgrade pip setuptools` ran first (what most
guides and many base images do) `import tensorflow_hub` fails. Rather than hold users' setuptools
below 81, hub gets, for the length of its import and only when pkg_resources is missing, a module
holding that one function: packaging's `parse`, the parser setuptools' own was built on.
"""
from __future__ import annotations

import importlib.util
import sys
import types


def _import_hub() -> types.ModuleType:
    if "tensorflow_hub" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        import tensorflow_hub

        return tensorflow_hub
    from packaging.version import parse

    stand_in = types.ModuleType("pkg_resources", "parse_version only, for tensorflow_hub's import (trainer/hub.py)")
    stand_in.parse_version = parse  # type: ignore[attr-defined]
    missing = object()
    before = sys.modules.get("pkg_resources", missing)
    sys.modules["pkg_resources"] = stand_in
    try:
        import tensorflow_hub
    finally:
        # Nothing else may mistake the stand-in for setuptools' module.
        if before is missing:
            del sys.modules["pkg_resources"]
        else:
            sys.modules["pkg_resources"] = before  # type: ignore[assignment]
    return tensorflow_hub


hub = _import_hub()
