#!/usr/bin/env bash
# Find or build a free-threaded CPython 3.13 (python3.13t), then make .venv with it and install the
# project into it when pyproject.toml changed since the last install.
#
#   tools/bootstrap.sh              find/build the interpreter, make .venv, install
#   tools/bootstrap.sh --find       print the interpreter that would be used (no build, no venv)
#   tools/bootstrap.sh --python     find or build the interpreter and print its path (no venv)
#   tools/bootstrap.sh --check-build-deps   say which Debian packages a build would need
#
# Search order: $EVENTSTREAM_PYTHON, python3.13t on PATH, the cached build, else build from
# $EVENTSTREAM_CPYTHON_TARBALL, ../shared/toolchain/Python-3.13.15.tar.xz or python.org.
set -euo pipefail

PY_VERSION=3.13.15
PY_URL="https://www.python.org/ftp/python/${PY_VERSION}/Python-${PY_VERSION}.tar.xz"
PY_SHA256=1e66a7945a48390ee4c2a4268a0e4185884059a13c4aab6d148aa208deea4a76
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/eventstream"
PREFIX="$CACHE_DIR/cpython-${PY_VERSION}t"
CACHED_PY="$PREFIX/bin/python3.13t"
VENV="${EVENTSTREAM_VENV:-$ROOT/.venv}"
SHARED_TARBALL="$ROOT/../shared/toolchain/Python-${PY_VERSION}.tar.xz"

say() { echo "bootstrap: $*" >&2; }
die() { echo "bootstrap: error: $*" >&2; exit 1; }

# is_free_threaded PY -> 0 when PY runs and is a --disable-gil build of 3.13+
is_free_threaded() {
  "$1" -c 'import sys, sysconfig
ok = sysconfig.get_config_var("Py_GIL_DISABLED") == 1 and sys.version_info >= (3, 13)
sys.exit(0 if ok else 1)' >/dev/null 2>&1
}

find_python() {
  if [ -n "${EVENTSTREAM_PYTHON:-}" ]; then
    [ -x "$EVENTSTREAM_PYTHON" ] || command -v "$EVENTSTREAM_PYTHON" >/dev/null 2>&1 \
      || die "EVENTSTREAM_PYTHON=$EVENTSTREAM_PYTHON is not an executable; set it to a free-threaded python3.13t or unset it"
    is_free_threaded "$EVENTSTREAM_PYTHON" \
      || die "EVENTSTREAM_PYTHON=$EVENTSTREAM_PYTHON is not a free-threaded build (sysconfig Py_GIL_DISABLED != 1); allowed: a CPython >= 3.13 configured with --disable-gil, or unset it to let bootstrap find/build one"
    echo "$EVENTSTREAM_PYTHON"; return 0
  fi
  local onpath
  if onpath=$(command -v python3.13t 2>/dev/null) && is_free_threaded "$onpath"; then
    echo "$onpath"; return 0
  fi
  if [ -x "$CACHED_PY" ] && is_free_threaded "$CACHED_PY"; then
    echo "$CACHED_PY"; return 0
  fi
  return 1
}

check_build_deps() {
  local missing=()
  command -v gcc >/dev/null 2>&1 || missing+=(gcc)
  command -v make >/dev/null 2>&1 || missing+=(make)
  local hdr pkg
  for pair in openssl/ssl.h:libssl-dev ffi.h:libffi-dev zlib.h:zlib1g-dev bzlib.h:libbz2-dev \
              lzma.h:liblzma-dev sqlite3.h:libsqlite3-dev readline/readline.h:libreadline-dev \
              uuid/uuid.h:uuid-dev; do
    hdr=${pair%%:*}; pkg=${pair##*:}
    if command -v gcc >/dev/null 2>&1; then
      echo "#include <$hdr>" | gcc -E -x c - >/dev/null 2>&1 || missing+=("$pkg")
    fi
  done
  if [ ${#missing[@]} -gt 0 ]; then
    die "cannot build CPython ${PY_VERSION}t: missing build dependencies. Install them with:
    sudo apt-get install ${missing[*]}
(libnuma1 is also needed at run time: sudo apt-get install libnuma1)"
  fi
}

fetch_tarball() {  # prints path of a verified tarball
  local work=$1
  if [ -n "${EVENTSTREAM_CPYTHON_TARBALL:-}" ]; then
    [ -f "$EVENTSTREAM_CPYTHON_TARBALL" ] || die "EVENTSTREAM_CPYTHON_TARBALL=$EVENTSTREAM_CPYTHON_TARBALL does not exist"
    say "using source tarball $EVENTSTREAM_CPYTHON_TARBALL"
    echo "$EVENTSTREAM_CPYTHON_TARBALL"; return
  fi
  if [ -f "$SHARED_TARBALL" ]; then
    local sums; sums="$(dirname "$SHARED_TARBALL")/SHA256SUMS"
    if [ -f "$sums" ]; then
      (cd "$(dirname "$SHARED_TARBALL")" && sha256sum -c --status --ignore-missing SHA256SUMS) \
        || die "$SHARED_TARBALL does not match $sums (corrupt copy?)"
    else
      echo "$PY_SHA256  $SHARED_TARBALL" | sha256sum -c --status || die "$SHARED_TARBALL has the wrong SHA256"
    fi
    say "using source tarball $SHARED_TARBALL (sha256 verified)"
    echo "$SHARED_TARBALL"; return
  fi
  say "downloading $PY_URL"
  if command -v curl >/dev/null 2>&1; then curl -fsSL -o "$work/src.tar.xz" "$PY_URL"
  elif command -v wget >/dev/null 2>&1; then wget -q -O "$work/src.tar.xz" "$PY_URL"
  else die "no source tarball and neither curl nor wget to download $PY_URL"; fi
  echo "$PY_SHA256  $work/src.tar.xz" | sha256sum -c --status || die "downloaded tarball has the wrong SHA256"
  echo "$work/src.tar.xz"
}

build_python() {
  check_build_deps
  mkdir -p "$CACHE_DIR"
  local work log tarball jobs start
  work=$(mktemp -d "$CACHE_DIR/build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  log="$CACHE_DIR/build-${PY_VERSION}t.log"
  : >"$log"
  jobs=$(nproc 2>/dev/null || echo 2)
  start=$(date +%s)
  say "building free-threaded CPython ${PY_VERSION}t into $PREFIX (about 4 minutes on 2 cores; log: $log)"
  tarball=$(fetch_tarball "$work")
  say "[1/4] unpacking"
  tar -xJf "$tarball" -C "$work" >>"$log" 2>&1 || die "unpacking failed; see $log"
  local src="$work/Python-${PY_VERSION}"
  say "[2/4] configure --disable-gil"
  (cd "$src" && ./configure --disable-gil --prefix="$PREFIX" --with-ensurepip=install) >>"$log" 2>&1 \
    || die "configure failed; see $log"
  say "[3/4] make -j$jobs"
  (cd "$src" && make -j"$jobs") >>"$log" 2>&1 || die "make failed; see $log"
  say "[4/4] make install"
  # install into a staging dir under the temp dir, then move into place in one rename
  (cd "$src" && make install DESTDIR="$work/stage") >>"$log" 2>&1 || die "make install failed; see $log"
  rm -rf "$PREFIX.old"
  [ -d "$PREFIX" ] && mv "$PREFIX" "$PREFIX.old"
  mv "$work/stage$PREFIX" "$PREFIX"
  rm -rf "$PREFIX.old" "$work"
  trap - EXIT
  is_free_threaded "$CACHED_PY" || die "the build finished but $CACHED_PY is not a free-threaded interpreter; see $log"
  say "built $CACHED_PY in $(( $(date +%s) - start ))s"
}

ensure_python() {
  local py
  if py=$(find_python); then echo "$py"; return; fi
  mkdir -p "$CACHE_DIR"
  # one build at a time: a second concurrent run waits here, then finds the finished build
  exec 9>"$CACHE_DIR/build.lock"
  if ! flock -n 9; then
    say "another bootstrap is building CPython; waiting for it (lock $CACHE_DIR/build.lock)"
    flock 9
  fi
  if py=$(find_python); then echo "$py"; return; fi
  build_python
  exec 9>&-
  echo "$CACHED_PY"
}

ensure_venv() {
  local py=$1 stamp="$VENV/.eventstream-installed" want
  if [ -x "$VENV/bin/python" ] && ! is_free_threaded "$VENV/bin/python"; then
    say "$VENV is not a free-threaded venv; recreating it"
    rm -rf "$VENV"
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $py"
    "$py" -m venv "$VENV"
  fi
  # the stamp holds the pyproject.toml hash and the extras installed with it: reinstall when the
  # file changed or an extra is asked for that is not installed yet (never drop one already there)
  want=$(sha256sum <"$ROOT/pyproject.toml" | cut -d' ' -f1)
  local have_hash="" have_extras="" extras="dev" e missing=0
  if [ -f "$stamp" ]; then read -r have_hash have_extras <"$stamp" || true; fi
  extras="dev,${EVENTSTREAM_EXTRAS:-}"
  [ "$have_hash" = "$want" ] && extras="$extras,${have_extras}"
  extras=$(echo "$extras" | tr ',' '\n' | sed '/^$/d' | sort -u | paste -sd, -)
  for e in ${extras//,/ }; do
    case ",$have_extras," in *",$e,"*) ;; *) missing=1 ;; esac
  done
  if [ "$have_hash" != "$want" ] || [ "$missing" = 1 ]; then
    say "installing eventstream into $VENV (pip install -e '.[$extras]')"
    export PYTHON_GIL=0
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip >&2
    (cd "$ROOT" && "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e ".[$extras]") >&2 \
      || die "pip install failed (see the output above)"
    echo "$want $extras" >"$stamp"
  fi
}

case "${1:-}" in
  --find) find_python || { say "no free-threaded python found (run tools/bootstrap.sh to build one)"; exit 1; } ;;
  --python) ensure_python ;;
  --check-build-deps) check_build_deps; say "build dependencies present" ;;
  ""|--venv) py=$(ensure_python); ensure_venv "$py" ;;
  -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) die "unknown option '$1'; allowed: --find, --python, --venv, --check-build-deps, --help" ;;
esac
