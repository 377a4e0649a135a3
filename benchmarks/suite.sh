#!/usr/bin/env bash
# The whole test suite in ONE process (what crashed at its end about one run in five, issue 29), in a fresh clone of
# this repository's HEAD, core files kept: `bash benchmarks/suite.sh CLONE_DIR [VENV]`. Writes CLONE_DIR.log, beside
# the clone (the suite checks that its tree is unchanged): pytest's output, then a line: rc, seconds, commit, the load
# at the start and at the end. Leaves any core file in CLONE_DIR (open it with: gdb VENV/bin/python CLONE_DIR/core -batch -ex 'thread apply all bt').
set -u
d=$1
venv=${2:-$(cd "$(dirname "$0")/.." && pwd)/.venv}
git clone -q "$(cd "$(dirname "$0")/.." && pwd)" "$d" || exit 1
cd "$d" || exit 1
ulimit -c unlimited
export PYTHONFAULTHANDLER=1 PYTHONPATH=$d/src CI=true
load_before=$(cut -d' ' -f1 /proc/loadavg)
start=$(date +%s)
"$venv/bin/python" -m pytest -q -p no:cacheprovider > "$d.log" 2>&1
rc=$?
echo "rc=$rc seconds=$(( $(date +%s) - start )) commit=$(git rev-parse --short HEAD) load_before=$load_before" \
     "load_after=$(cut -d' ' -f1 /proc/loadavg)" >> "$d.log"
ls -la "$d"/core* >> "$d.log" 2>/dev/null
exit $rc
