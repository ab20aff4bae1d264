#!/usr/bin/env bash
# Runs every fuzz target for a short while (CI: 20 s each). A crash fails the
# run; its input is left in fuzz/artifacts/<target>/ to be committed as a
# regression test (fuzz/regressions/<target>/ inputs are replayed first).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
cargo +nightly fuzz build -O
for t in $(cargo +nightly fuzz list); do
    mkdir -p "corpus/$t" "regressions/$t"
    # Known crash inputs first, then a fresh run seeded with the corpus.
    if [ -n "$(ls -A "regressions/$t")" ]; then
        cargo +nightly fuzz run -O "$t" "regressions/$t"/* -- -runs=0
    fi
    echo "== $t (${secs}s)"
    log="$(mktemp)"
    rc=0
    cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -max_len=4096 >"$log" 2>&1 || rc=$?
    grep -E "^(#[0-9]+ +DONE|==[0-9]+==|SUMMARY|thread .* panicked)|Done [0-9]+ runs" "$log" || true
    if [ "$rc" -ne 0 ]; then
        # (A pipeline with `|| true` under pipefail hid this exit status before.)
        tail -40 "$log"
        echo "fuzz target $t failed (exit $rc); the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    rm -f "$log"
done
