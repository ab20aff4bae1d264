#!/usr/bin/env bash
# Runs the same scenarios against two builds of holdfast, interleaved (old,
# new, old, new...) so that the machine's noise hits both alike, and prints
# one line per run. Usage: compare-builds.sh OLD_RELEASE_DIR NEW_RELEASE_DIR OUT_DIR
# (each RELEASE_DIR holds hf-bench, holdfast and holdfast-wsm from one commit).
set -euo pipefail
old="$1"; new="$2"; out="$3"
mkdir -p "$out/old" "$out/new"
scenarios=(
  "--scenario idle --label 15k --conns 15000 --procs 4 --rate 2500"
  "--scenario handshake --label tls13 --tls 1.3 --conns 32 --procs 2 --duration 10"
  "--scenario message --label 64b --conns 2000 --procs 2 --msg-size 64 --msg-rate 2 --duration 15"
  "--scenario message --label saturation-64b --conns 200 --procs 2 --msg-size 64 --msg-rate 0 --duration 10"
  "--scenario upgrade --label active-15k --conns 15000 --procs 4 --rate 2500 --msg-rate 1 --duration 15"
)
for s in "${scenarios[@]}"; do
  for build in old new; do
    dir="$old"; [ "$build" = new ] && dir="$new"
    # shellcheck disable=SC2086
    line=$("$dir/hf-bench" run $s --proxies holdfast --out "$out/$build" 2>&1 | grep -E "^[a-z]+ holdfast:" | tail -1)
    echo "$build | $s | $line"
  done
done
