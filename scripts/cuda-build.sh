#!/usr/bin/env bash
# Builds the CUDA binary (`--features cuda`) on a machine without a GPU
# (../shared/docs/CUDA.md): nvcc 13.0 from PyPI, kernels for sm_90 (H100/H200),
# a patched copy of candle-core whose cudarc loads CUDA at run time
# (`dynamic-loading`), the CUDA runtime linked statically (build.rs).
# The patch is passed only here, with its own target dir, so the CPU build
# and Cargo.lock never see it. Cold build ~19 minutes on 2 cores.
#
#   scripts/cuda-build.sh            # -> target-cuda/release/gpt-serve
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLCHAIN=${TOOLCHAIN:-../shared/tools/cuda-toolchain}
[ -x "$TOOLCHAIN" ] || { echo "cuda-build: $TOOLCHAIN not found (it installs nvcc 13.0 from PyPI)"; exit 1; }
eval "$("$TOOLCHAIN")"
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$PWD/target-cuda}

# candle-core's version from Cargo.lock, its sources from the cargo registry.
ver=$(awk '/^name = "candle-core"$/ {getline; gsub(/"/, "", $3); print $3; exit}' Cargo.lock)
cargo fetch --locked >/dev/null
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-"$ver" | head -n1)
patched=$CARGO_TARGET_DIR/patched/candle-core-$ver
if [ ! -f "$patched/.patched" ]; then
  rm -rf "$patched"; mkdir -p "$(dirname "$patched")"; cp -r "$src" "$patched"
  # cudarc: load CUDA with dlopen at run time instead of linking it.
  sed -i 's/"dynamic-linking"/"dynamic-loading"/g' "$patched/Cargo.toml"
  grep -q '"dynamic-loading"' "$patched/Cargo.toml" || { echo "cuda-build: could not patch $patched/Cargo.toml"; exit 1; }
  touch "$patched/.patched"
fi
cargo build --release --features cuda --bin gpt-serve \
  --config "patch.crates-io.candle-core.path=\"$patched\""
# Keep the CPU lockfile as it was (the patch is not part of the project).
git checkout -- Cargo.lock 2>/dev/null || true
ls -la "$CARGO_TARGET_DIR/release/gpt-serve"
