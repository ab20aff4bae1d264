#!/usr/bin/env python3
"""Kernel memory per established TCP socket, as an idle device connection
costs a holdfast node: slab growth (/proc/meminfo Slab) while N loopback
connections are open, divided by the 2N sockets (both ends live on this
host, and each end is the kind of socket a node holds per device).
Idle sockets hold no buffer pages (/proc/net/sockstat 'mem' is printed too).

  python3 bench/scripts/socket-kernel-memory.py [N]   (default 8000; needs 2N+ descriptors)
"""
import socket
import sys


def slab_kib():
    for line in open("/proc/meminfo"):
        if line.startswith("Slab:"):
            return int(line.split()[1])
    return 0


def tcp_mem_pages():
    for line in open("/proc/net/sockstat"):
        if line.startswith("TCP:"):
            f = line.split()
            return int(f[f.index("mem") + 1])
    return 0


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    addr = srv.getsockname()
    before, mem0 = slab_kib(), tcp_mem_pages()
    pairs = []
    for _ in range(n):
        c = socket.create_connection(addr)
        s, _ = srv.accept()
        pairs.append((c, s))
    after, mem1 = slab_kib(), tcp_mem_pages()
    per = (after - before) * 1024 / (2 * n)
    print("%d connections (%d sockets): slab +%d KiB, %.0f bytes per socket; TCP buffer pages %d -> %d" % (n, 2 * n, after - before, per, mem0, mem1))
    for c, s in pairs:
        c.close()
        s.close()


if __name__ == "__main__":
    main()
