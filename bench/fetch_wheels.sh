#!/usr/bin/env bash
# Build .whl_train/ (or DEST): wheels of the packages sh2 and its benchmarks need that the GPU image lacks
# (datasets, jsonargparse, deepspeed, fla-core and their missing dependencies; the image has torch, triton,
# lightning, pyarrow, pandas, fsspec, xxhash, ...):
#   bash bench/fetch_wheels.sh [DEST]          # DEST relative to the current folder or absolute
# Run with the sh2 virtual environment active (building deepspeed imports torch), in the repository root; the
# GPU scripts (bench/gpu_app.sh, bench/multi_gpu.sh) install them from .whl_train/ into /tmp/site. Keep
# .whl_train/ out of git (echo /.whl_train/ >> .git/info/exclude) and name it in the device call's carry list.
set -euo pipefail
mkdir -p "${1:-.whl_train}"
DEST=$(cd "${1:-.whl_train}" && pwd)  # absolute: the deepspeed wheel is built from another folder
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST" datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  jsonargparse==4.53.0 docstring-parser typeshed-client pydantic pydantic-core annotated-types typing-inspection hjson \
  fla-core==0.6.0 einops
# deepspeed ships as a source distribution: build a pure-Python wheel (ops are JIT-compiled on first use).
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" deepspeed==0.19.8
tar xzf "$tmp"/deepspeed-*.tar.gz -C "$tmp"
(cd "$tmp"/deepspeed-0.19.8 && DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" .)
rm -rf "$tmp"
ls -la "$DEST"
