#!/usr/bin/env bash
# Isolated virtual environments for the peer tools the benchmarks compare against.
# They are never installed beside musclenode: myoqmri is GPL-3.0 and pins pypulseq 1.4.2.
#   bash bench/peers/setup.sh [DIR]     (default: .bench-venvs/ in the repository root)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${1:-$root/.bench-venvs}"
mkdir -p "$dir"
if [ ! -x "$dir/myoqmri/bin/python" ]; then
  python3 -m venv "$dir/myoqmri"
  "$dir/myoqmri/bin/pip" install -q "myoqmri==2.0.2"
  echo "myoqmri 2.0.2 installed in $dir/myoqmri"
else
  echo "myoqmri: $dir/myoqmri exists"
fi
if [ ! -x "$dir/bloch/bin/python" ]; then
  python3 -m venv "$dir/bloch"
  "$dir/bloch/bin/pip" install -q blochsimulator
  echo "blochsimulator installed in $dir/bloch"
else
  echo "blochsimulator: $dir/bloch exists"
fi
