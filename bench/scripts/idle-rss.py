#!/usr/bin/env python3
"""Idle memory per connection, measured from outside with Python's ssl.

Starts the reference WSM and holdfast (one shard) from the release build on
a development PKI that `holdfast quickstart` writes, then opens N idle mTLS
WebSocket connections from several client processes (Python's ssl module,
OpenSSL: not holdfast's own device code), and reads holdfast's RSS from
/proc when half and all of them are up and quiet. Prints the average and
the marginal (second-half) RSS per connection, and holdfast's own
accounting (holdfast_tunnel_state_bytes) beside it.

    python3 bench/scripts/idle-rss.py [N] [PROCS]     (default 15000 4)

The devices present distinct certificates (256 of them, from the dev PKI's
two fleet CAs, used in turn), as a real fleet does: holdfast keeps each
connection's certificate to re-open its stream elsewhere, and identical
certificates would make that look cheaper than it is. IDLE_RSS_FLEET=0 makes
every device present the same one (devices/oven-1).

HOLDFAST_RELEASE_DIR names another build (holdfast and holdfast-wsm).
"""
import multiprocessing as mp
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REL = os.environ.get("HOLDFAST_RELEASE_DIR", os.path.join(ROOT, "target", "release"))
PORT, WSM_PORT, METRICS_PORT = 28443, 29000, 29100
FLEET = int(os.environ.get("IDLE_RSS_FLEET", "256"))
UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def connect(ctx, src):
    s = socket.create_connection(("127.0.0.1", PORT), timeout=30, source_address=(src, 0))
    t = ctx.wrap_socket(s, server_hostname="localhost")
    t.sendall(UPGRADE)
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = t.recv(4096)
        if not chunk:
            raise RuntimeError("closed during upgrade")
        got += chunk
    if not got.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(got.split(b"\r\n")[0].decode())
    return t


def contexts(d):
    """One TLS context per device certificate the workers present."""
    if FLEET == 0:
        pairs = [(os.path.join(d, "devices", "oven-1.pem"), os.path.join(d, "devices", "oven-1.key"))]
    else:
        pairs = [(os.path.join(d, "devices", "fleet", f"{k:05}.pem"), os.path.join(d, "devices", "fleet", f"{k:05}.key"))
                 for k in range(FLEET)]
    out = []
    for cert, key in pairs:
        ctx = ssl.create_default_context(cafile=os.path.join(d, "server-ca.pem"))
        ctx.load_cert_chain(cert, key)
        out.append(ctx)
    return out


def worker(i, n, d, ready, go, stop):
    ctxs = contexts(d)
    src = f"127.0.0.{2 + i}"
    held = []
    for half in (0, 1):
        for _ in range(n // 2 if half == 0 else n - n // 2):
            held.append(connect(ctxs[(len(held) + i) % len(ctxs)], src))
        ready.put((i, half))
        if half == 0:
            go.wait()
    stop.wait()
    for t in held:
        t.close()


def metric(name):
    body = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in body.splitlines() if l.startswith(name + "{"))


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 15000
    procs = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    tmp = tempfile.mkdtemp(prefix="idle-rss-")
    d = os.path.join(tmp, "pki")
    # The PKI always comes from this checkout's build (an older build under
    # test may not write fleet certificates).
    tool = os.path.join(ROOT, "target", "release", "holdfast")
    subprocess.run([tool if os.path.exists(tool) else os.path.join(REL, "holdfast"), "quickstart", "--dir", d, "--port", str(PORT), "--wsm-port", str(WSM_PORT),
                    "--metrics-port", str(METRICS_PORT), "--check-only", "--fleet", str(FLEET)], check=True, capture_output=True)
    cfg = os.path.join(d, "holdfast.toml")
    text = open(cfg).read().replace("shards = 2", "shards = 1")
    open(cfg, "w").write(text)
    wsm = subprocess.Popen([os.path.join(REL, "holdfast-wsm"), "--listen", f"127.0.0.1:{WSM_PORT}"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    wsm.stdout.readline()
    proxy = subprocess.Popen([os.path.join(REL, "holdfast"), "run", "--config", cfg, "--log", "warn"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proxy.stdout.readline()
    try:
        time.sleep(1)
        base = rss_kib(proxy.pid)
        ready, go, stop = mp.Queue(), mp.Event(), mp.Event()
        ws = [mp.Process(target=worker, args=(i, n // procs, d, ready, go, stop)) for i in range(procs)]
        for w in ws:
            w.start()
        for _ in ws:
            ready.get(timeout=600)
        time.sleep(4)  # past the 2 s key cooling: every connection idle
        half = rss_kib(proxy.pid)
        go.set()
        for _ in ws:
            ready.get(timeout=600)
        time.sleep(4)
        full = rss_kib(proxy.pid)
        total = (n // procs) * procs
        state = metric("holdfast_tunnel_state_bytes") / max(1, metric("holdfast_connections_active"))
        print(f"connections {total}: RSS start {base} KiB, half {half} KiB, all {full} KiB")
        print(f"average {(full - base) * 1024 / total:.0f} B/conn, marginal (second half) "
              f"{(full - half) * 1024 / (total - total // 2):.0f} B/conn; holdfast's own accounting {state:.0f} B/conn")
        stop.set()
        for w in ws:
            w.join()
    finally:
        proxy.terminate()
        wsm.terminate()
        proxy.wait()
        wsm.wait()


if __name__ == "__main__":
    main()
