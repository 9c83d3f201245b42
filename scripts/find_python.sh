#!/usr/bin/env bash
# Prints the path of a CPython this project supports: the first of the versions given (default: every
# supported one, oldest first) that is installed and runs. Looks on PATH, then in pyenv's versions
# (whose shims on PATH fail for versions that are installed but not selected). Exits 1, loudly, when
# none is found: CI must never skip a Python it was asked to test.
set -euo pipefail
SUPPORTED=(3.11 3.12 3.13)  # keep in step with setup.py's python_requires (tests/test_deploy.py checks)
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=("${SUPPORTED[@]}")
for version in "${wanted[@]}"; do
  case " ${SUPPORTED[*]} " in *" $version "*) ;; *) echo "find_python: $version is not supported (${SUPPORTED[*]})" >&2; exit 2 ;; esac
  candidates=("python$version")
  for dir in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin; do
    [ -x "$dir/python$version" ] && candidates+=("$dir/python$version")
  done
  for candidate in "${candidates[@]}"; do
    if path="$(command -v "$candidate" 2>/dev/null)" \
        && [ "$("$path" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$version" ]; then
      echo "$path"
      exit 0
    fi
  done
done
echo "find_python: no CPython ${wanted[*]} found (on PATH or under ${PYENV_ROOT:-$HOME/.pyenv}/versions); install one" >&2
exit 1
