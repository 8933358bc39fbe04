#!/usr/bin/env bash
# Static checks of eventstream/ (configured in pyproject.toml): ruff lint, ruff format --check, mypy.
# Runs all three and exits non-zero when any of them finds something.
#
#   tools/lint.sh            all checks
#   tools/lint.sh PATH...    ruff on PATH..., mypy on PATH... (default: eventstream)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHON_GIL=0
BIN="${EVENTSTREAM_VENV:-$ROOT/.venv}/bin"
for tool in ruff mypy; do
  [ -x "$BIN/$tool" ] || { echo "lint: $BIN/$tool is missing; run tools/bootstrap.sh (it installs the dev extra)" >&2; exit 2; }
done
paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(eventstream)
status=0
echo "lint: ruff check ${paths[*]}" >&2
"$BIN/ruff" check "${paths[@]}" || status=1
echo "lint: ruff format --check ${paths[*]}" >&2
"$BIN/ruff" format --check "${paths[@]}" || status=1
echo "lint: mypy ${paths[*]}" >&2
"$BIN/mypy" "${paths[@]}" || status=1
[ $status -eq 0 ] && echo "lint: clean" >&2
exit $status
