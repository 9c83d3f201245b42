#!/usr/bin/env bash
# Runs the test suite after making sure the environment is set up. Extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh"
venv="${TAGBEAM_VENV:-$root/.venv}"
cd "$root"
"$venv/bin/python" -m trainer.embedded_backbone build --all
exec "$venv/bin/python" -m pytest -q "$@" tests
