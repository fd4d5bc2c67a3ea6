#!/usr/bin/env bash
# Bedside developer entry point.
#   scripts/dev.sh demo [bedside demo args]   set everything up, then run the demo
#   scripts/dev.sh test [pytest args]         set everything up, then run the whole test suite
#   scripts/dev.sh setup                      only set up (.venv, .venv-triton, apt packages)
# Idempotent: a second run skips what is already installed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
VENV="$ROOT/.venv"
TRITON_VENV="$ROOT/.venv-triton"
export BEDSIDE_TRITON_ENV="$TRITON_VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The Helm SDK is a Go shared library; the suite loads it in the same process as OpenVINO and
# ONNX Runtime, whose pool threads Go's signal-based preemption can hit: the Go scheduler then
# crashed with SIGSEGV. Go reads GODEBUG from the environment the process started with, so it
# is set here, before Python starts.
export GODEBUG="${GODEBUG:+$GODEBUG,}asyncpreemptoff=1"

log() { printf '[dev.sh] %s\n' "$*" >&2; }

as_root_or_explain() {  # $1: why; rest: Debian packages
  local why=$1; shift
  if [ "$(id -u)" = 0 ]; then
    log "installing Debian packages ($why): $*"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
      --no-install-recommends "$@" >/dev/null
  else
    log "missing Debian packages ($why). As root, run: apt-get install $*"
    exit 1
  fi
}

check_python() {
  "$PYTHON" - <<'PY' || { log "Python 3.11 or 3.12 is required (set PYTHON=...)"; exit 1; }
import sys
sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 12) else 1)
PY
  if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    as_root_or_explain "virtual environments" python3-venv
  fi
}

stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

setup_venv() {
  local stamp; stamp=$(stamp_of pyproject.toml scripts/dev.sh)
  if [ -f "$VENV/.bedside-stamp" ] && [ "$(cat "$VENV/.bedside-stamp")" = "$stamp" ]; then
    return
  fi
  log "creating $VENV (torch 2.13.0 CPU, MONAI, ONNX Runtime, pydicom, pynetdicom, tritonclient)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[optimizer,deploy,dev,load]"
  echo "$stamp" > "$VENV/.bedside-stamp"
}

setup_triton_venv() {
  local stamp; stamp=$(stamp_of services/triton/requirements.txt)
  if [ -f "$TRITON_VENV/.bedside-stamp" ] && [ "$(cat "$TRITON_VENV/.bedside-stamp")" = "$stamp" ]; then
    return
  fi
  log "creating $TRITON_VENV (Triton's runtime: nvidia-pytriton, onnxruntime, numpy<2)"
  [ -x "$TRITON_VENV/bin/python" ] || "$PYTHON" -m venv "$TRITON_VENV"
  "$TRITON_VENV/bin/python" -m pip install -q --upgrade pip
  "$TRITON_VENV/bin/python" -m pip install -q -r services/triton/requirements.txt
  echo "$stamp" > "$TRITON_VENV/.bedside-stamp"
}

setup_test_peers() {
  # Real peers for the tests: dcmtk (storescu, echoscu), dicom3tools (dciodvfy validates the
  # SR/SEG we write), prometheus (promtool checks the chart's alert rules), orthanc and its
  # DICOMweb plugin (a real PACS that forwards studies and receives results).
  local missing=()
  [ -x /usr/bin/storescu ] && [ -x /usr/bin/echoscu ] || missing+=(dcmtk)
  [ -x /usr/bin/dciodvfy ] || missing+=(dicom3tools)
  [ -x /usr/bin/promtool ] || missing+=(prometheus)
  [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)  # a real PACS for the DIMSE/DICOMweb tests
  [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
  [ -x /usr/bin/openssl ] || missing+=(openssl)  # certificates for the DICOM TLS tests
  # PixelMed's SR and IOD validators (what IHE Connectathons check AI results with); the test
  # runner batches files through Java's source launcher, which needs a JDK.
  [ -f /usr/share/java/pixelmed.jar ] || missing+=(pixelmed-apps libpixelmed-java)
  command -v javac >/dev/null || missing+=(openjdk-17-jdk-headless)
  # PostgreSQL 15: the shared job table of several gateway replicas, started by the tests
  [ -x /usr/lib/postgresql/15/bin/postgres ] || missing+=(postgresql)
  [ ${#missing[@]} = 0 ] || as_root_or_explain "test peers" "${missing[@]}"
}

setup() {
  check_python
  setup_venv
  setup_triton_venv
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup; setup_test_peers ;;
  demo) setup; exec "$VENV/bin/bedside" demo "$@" ;;
  test) setup; setup_test_peers; exec "$VENV/bin/python" -m pytest "$@" ;;
  lint) setup; "$VENV/bin/ruff" check . && "$VENV/bin/mypy" ;;
  *) echo "usage: scripts/dev.sh {demo|test|setup|lint} [args...]" >&2; exit 2 ;;
esac
