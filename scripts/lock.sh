#!/usr/bin/env bash
# Hashed lock files the images install from (pip --require-hashes), compiled from
# pyproject.toml with uv (the dev extra installs it):
#   requirements/gateway.lock     core dependencies: the gateway image, Python 3.11 and 3.12
#   requirements/optimizer.lock   core + optimizer + deploy extras: the optimizer image, 3.11
#   requirements/triton-cpu.lock  requirements/triton-cpu.in: the triton-cpu image (NVIDIA's
#                                 Triton image, Python 3.10)
# All for linux x86_64. torch is the CPU build 2.13.0+cpu from the PyTorch CPU index (PyPI's
# linux torch wheel is the CUDA build and pulls gigabytes of nvidia packages); where that
# index cannot be reached, a local wheel directory is used instead: TORCH_FIND_LINKS=DIR (by
# default /opt/wheels when it holds the wheel). Its hash is then that of the local file, which
# is the PyTorch index's file only if the copy is unmodified: check it once where that index
# can be reached (this script, run there, rewrites the lock from the index itself).
#
#   scripts/lock.sh    regenerate all three (needs PyPI); versions already pinned are kept
#                      unless pyproject.toml excludes them. tests/deploy/test_dockerfile.py
#                      fails while a lock lacks a dependency or pins one outside its range.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
UV=${UV:-$ROOT/.venv/bin/uv}
OUT=requirements
PLATFORM=x86_64-manylinux_2_28
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

[ -x "$UV" ] || { echo "uv not found at $UV: scripts/dev.sh setup (dev extra) installs it" >&2; exit 1; }

compile() {  # $1: output; rest: uv pip compile arguments
  local out=$1; shift
  "$UV" pip compile --quiet --generate-hashes --no-annotate --index-url https://pypi.org/simple \
    --custom-compile-command "scripts/lock.sh" --output-file "$out" "$@"
}

# The gateway: one universal lock (environment markers where platforms differ) for every
# Python pyproject.toml allows (3.11, 3.12).
compile "$OUT/gateway.lock" pyproject.toml "$OUT/build.in" --universal --python-version 3.11

# The optimizer: torch's CPU build, from the PyTorch index or a local wheel directory.
torch_source=(--extra-index-url "$TORCH_CPU_INDEX" --index-strategy unsafe-best-match)
links=${TORCH_FIND_LINKS:-}
if [ -z "$links" ] && ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  links=/opt/wheels
fi
[ -n "$links" ] && torch_source=(--find-links "$links")
overrides=$(mktemp)
trap 'rm -f "$overrides"' EXIT
echo "torch==2.13.0+cpu" > "$overrides"
compile "$OUT/optimizer.lock" pyproject.toml "$OUT/build.in" --extra optimizer \
  --extra deploy --override "$overrides" "${torch_source[@]}" \
  --python-version 3.11 --python-platform "$PLATFORM"

compile "$OUT/triton-cpu.lock" "$OUT/triton-cpu.in" --python-version 3.10 \
  --python-platform "$PLATFORM"
echo "wrote $OUT/gateway.lock $OUT/optimizer.lock $OUT/triton-cpu.lock" >&2
