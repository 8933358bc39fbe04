#!/usr/bin/env bash
# Programs the test suite runs for real (not Python packages: those come with the `dev` extra).
#   promtool (Debian package `prometheus`): checks the metrics exposition.
#   redis-server (Debian package `redis-server`): the peer bench/peers.py measures against.
#   libisal (Debian package `libisal2`): core/crc.py computes large CRCs with it (zlib without it).
# Installed with apt-get when missing and we are root (or have password-less sudo); otherwise says how
# and the tests that need it skip locally. Under CI=true a test that needs a missing program fails.
set -euo pipefail
want=()
command -v promtool >/dev/null 2>&1 || want+=(prometheus)
command -v redis-server >/dev/null 2>&1 || want+=(redis-server)
ls /usr/lib/*/libisal.so.2 >/dev/null 2>&1 || ls /usr/lib/libisal.so.2 >/dev/null 2>&1 || want+=(libisal2)
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "test-deps: missing ${want[*]}; install with: sudo apt-get install --no-install-recommends ${want[*]}" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "test-deps: missing ${want[*]} and no apt-get here; the tests that need them skip (fail under CI)" >&2
  exit 0
fi
echo "test-deps: installing ${want[*]} (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null \
  || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null; } \
  || echo "test-deps: apt-get could not install ${want[*]}" >&2
