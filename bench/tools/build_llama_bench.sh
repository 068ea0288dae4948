#!/usr/bin/env bash
# Optional benchmark set-up: build llama.cpp's `llama-bench` from the source vendored in the
# llama-cpp-python sdist on PyPI, for `specmesh bench decode --llama-bench` (llama.cpp's native
# decode on the same GGUF and thread count as a baseline). Never a runtime dependency.
#
#   bench/tools/build_llama_bench.sh [OUT_DIR]      # default OUT_DIR: ~/.cache/specmesh/tools/llama.cpp
#
# Needs cmake, a C/C++ compiler and pip access to PyPI; about 6 minutes on 2 cores. Prints the
# binary's path last. The build is not -march=native: on an AVX-512/AMX Xeon a native build
# segfaulted in its first decode, so the instruction sets are named explicitly from /proc/cpuinfo
# (AVX2/FMA/F16C, plus AVX-512 where the CPU has it; AMX off).
set -euo pipefail
OUT="${1:-$HOME/.cache/specmesh/tools/llama.cpp}"
PYTHON="${PYTHON:-python3}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
tar -xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
       -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
if grep -qw avx512f /proc/cpuinfo; then flags+=(-DGGML_AVX512=ON); else flags+=(-DGGML_AVX512=OFF); fi
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TOOLS=ON "${flags[@]}" >"$WORK/cmake.log"
cmake --build "$WORK/build" --target llama-bench -j "$(nproc)" >"$WORK/build.log" 2>&1 || {
  tail -30 "$WORK/build.log" >&2
  exit 1
}
mkdir -p "$OUT"
cp "$WORK/build/bin/llama-bench" "$OUT/llama-bench"
printf 'llama-cpp-python %s (vendored llama.cpp), cmake flags: %s\n' "$VERSION" "${flags[*]}" >"$OUT/BUILD_INFO"
echo "$OUT/llama-bench"
