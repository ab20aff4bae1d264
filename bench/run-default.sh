#!/usr/bin/env bash
# Every scenario at the default scale (about 13 minutes on 2 cores), then the
# tables and charts. Usage: bench/run-default.sh [extra hf-bench run flags]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
B=target/release/hf-bench
$B run --scenario idle --conns 8000 --procs 4 --rate 2000 "$@"
$B run --scenario handshake --label tls13 --tls 1.3 --conns 32 --procs 2 --duration 10 "$@"
$B run --scenario handshake --label tls12 --tls 1.2 --conns 32 --procs 2 --duration 10 "$@"
$B run --scenario handshake --label tls13-resumed --tls 1.3 --resume --conns 32 --procs 2 --duration 10 "$@"
$B run --scenario message --label 64b --conns 2000 --procs 2 --msg-size 64 --msg-rate 2 --duration 15 "$@"
$B run --scenario message --label 1k --conns 2000 --procs 2 --msg-size 1024 --msg-rate 2 --duration 15 "$@"
$B run --scenario message --label saturation-64b --conns 200 --procs 2 --msg-size 64 --msg-rate 0 --duration 10 "$@"
$B run --scenario storm --conns 4000 --procs 4 --rate 2000 "$@"
$B run --scenario upgrade --label idle-15k --proxies holdfast --conns 15000 --procs 4 --rate 2500 --msg-rate 0.2 --duration 15 "$@"
$B run --scenario upgrade --label active-15k --proxies holdfast --conns 15000 --procs 4 --rate 2500 --msg-rate 1 --duration 15 "$@"
# The same loads without the upgrade: the pauses devices see anyway.
$B run --scenario upgrade --label idle-15k-nosignal --proxies holdfast --conns 15000 --procs 4 --rate 2500 --msg-rate 0.2 --duration 15 --no-signal "$@"
$B run --scenario upgrade --label active-15k-nosignal --proxies holdfast --conns 15000 --procs 4 --rate 2500 --msg-rate 1 --duration 15 --no-signal "$@"
# WSM failover: 10,000 streams on a WSM that is killed resume on another.
$B run --scenario failover --label 10k --proxies holdfast --conns 10000 --procs 4 --rate 2500 --msg-rate 1 --duration 20 "$@"
$B run --scenario failover --label 10k-fast --proxies holdfast --conns 10000 --procs 4 --rate 2500 --msg-rate 1 --duration 20 --resume-per-sec 50000 "$@"
$B report > bench/results/tables.md
echo "tables: bench/results/tables.md"
