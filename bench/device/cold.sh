#!/usr/bin/env bash
# There, on a lent device machine (16 cores, Python 3.12, nothing reachable): the many-core figures of the cold
# fetch against the ISA-L floor (#15 item 4), which the 2-core development machines cannot give. Prepare here
# with `bash bench/device/wheels.sh`, then run there, all in one call:
#   run(command="bash bench/device/cold.sh", carry=[".whl"], timeout_s=540)
# It installs the carried wheels beside the image's Python, runs bench/bench_cold.py (floor, streaming, through a
# daemon, and spool-then-rapidgzip on 1 to 16 threads, alternating) and leaves its table and JSON in $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
site=${SITE:-/tmp/site}
python=${PYTHON:-python3}
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  "${WHEELS:-.whl}"/*.whl
export PYTHONPATH="$site:$PWD:$PWD/client" PYTHONUNBUFFERED=1  # hubd and hubd_client from this checkout
# Byte-compile once (pip was told not to): else the first contender's process would pay for compiling every module
"$python" -m compileall -q -j 0 "$site" hubd client/hubd_client tests/hosting.py tests/daemon.py >/dev/null
out=${OUT:-/tmp/hubd-device-out}
mkdir -p "$out"
echo "== $(nproc) cores, $("$python" --version), $(uname -m)"
"$python" bench/bench_cold.py --mb "${MB:-400}" --rounds "${ROUNDS:-3}" --threads "${THREADS:-1,2,4,8,16}" \
  2>&1 | tee "$out/cold.txt"
cp bench/results/cold.json "$out/cold.json"
