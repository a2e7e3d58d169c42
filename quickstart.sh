#!/usr/bin/env bash
# Set up musclenode in ./.venv and run the demo or the test suite.
#   ./quickstart.sh demo   - a synthetic two-visit exam pushed through a node (embedded defaults)
#   ./quickstart.sh test   - lint (ruff, mypy), then the whole test suite (installs DCMTK, dicom3tools, Orthanc and its
#                            DICOMweb plugin, Chromium from Debian; fetches OHIF Viewer 3's dist from npm)
set -euo pipefail
cd "$(dirname "$0")"
what="${1:-demo}"; shift || true

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

debian_packages() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

venv() {
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then debian_packages python3-venv; fi
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[$1]"
  .venv/bin/musclenode -q warmup   # compile and cache the numba kernels now, not during the first study
}

case "$what" in
  demo)
    venv postgres
    exec .venv/bin/musclenode demo "$@"
    ;;
  test)
    # chromium: the dashboard test (Selenium) and the OHIF test (Playwright); orthanc-dicomweb: OHIF reads Orthanc by DICOMweb
    debian_packages dcmtk dicom3tools orthanc orthanc-dicomweb chromium chromium-driver
    venv test
    # OHIF Viewer 3's prebuilt dist into .cache/ohif/ (pinned, checked, once); without it tests/test_ohif.py skips
    .venv/bin/python tests/ohif/fetch.py >/dev/null || echo "warning: no OHIF viewer (npm registry unreachable?)" >&2
    export TCP_NODELAY=1
    echo "lint: ruff check, mypy ([tool.ruff] and [tool.mypy] in pyproject.toml)"
    .venv/bin/ruff check .
    .venv/bin/mypy
    exec .venv/bin/python -m pytest -q "$@"
    ;;
  *)
    echo "usage: $0 demo|test [args...]" >&2; exit 2 ;;
esac
