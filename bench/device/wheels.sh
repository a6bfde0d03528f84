#!/usr/bin/env bash
# Here, on the development machine: download the wheels that bench/device/cold.sh needs on a lent device
# machine (Python 3.12 there, no network) into .whl/ (ignored by git; name it in the run's carry). The versions
# are this checkout's .venv's, so the figures there are of the same libraries as here. About 20 MiB.
#   bash bench/device/wheels.sh
# A rehearsal on this machine's bare Python, which lacks what the device's image has:
#   PYVER=3.11 WHEELS=/tmp/w EXTRA="rich markdown-it-py mdurl pygments prometheus-client typing-extensions" \
#     bash bench/device/wheels.sh && SITE=/tmp/site WHEELS=/tmp/w MB=16 ROUNDS=1 THREADS=1,2 bash bench/device/cold.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
wheels=${WHEELS:-.whl}
# hubd's run-time dependencies and theirs, less what the device's image already has in a version that serves
# (rich and its own, prometheus-client, typing-extensions): see /work/.library/device/KINDS.md.
wanted="aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl idna pydantic pydantic_core
pydantic-settings annotated-types typing-inspection python-dotenv diskcache watchdog isal rapidgzip shtab ${EXTRA:-}"
pins=$(.venv/bin/python -m pip list --format=freeze 2>/dev/null | awk -F'==' -v want="$wanted" '
  BEGIN { n = split(want, w, /[ \n]+/); for (i = 1; i <= n; i++) { k = tolower(w[i]); gsub(/_/, "-", k); names[k] = 1 } }
  { k = tolower($1); gsub(/_/, "-", k); if (k in names) print $1 "==" $2 }')
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=" --platform $p"
done
mkdir -p "$wheels"
# shellcheck disable=SC2086  # word splitting of the pins and platforms is meant
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
  $platforms -d "$wheels" $pins
# pure-Python wheels ("py3-none-any") are found under any platform above
echo "$(ls "$wheels" | wc -l) wheels, $(du -sh "$wheels" | cut -f1), in $wheels"
