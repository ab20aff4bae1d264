#!/usr/bin/env python3
"""A device built on OpenSSL (Python's ssl module), independent of rustls.

Connects to holdfast with a client certificate, upgrades to WebSocket, sends a
text and a 100 KB binary message, checks both echoes, closes, and prints one
JSON line: {"version", "cipher", "text", "binary_ok", "close_code"}.

usage: openssl_device.py HOST PORT SERVER_CA CERT KEY VERSION [CIPHER]
VERSION is 1.2 or 1.3; CIPHER (OpenSSL name) restricts TLS 1.2 suites.
"""
import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import sys


def frame(opcode, payload):
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n <= 0xFFFF:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_exact(s, n, buf):
    while len(buf) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def read_frame(s, buf):
    buf = read_exact(s, 2, buf)
    opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
    off = 2
    if n == 126:
        buf = read_exact(s, 4, buf)
        n, off = struct.unpack(">H", buf[2:4])[0], 4
    elif n == 127:
        buf = read_exact(s, 10, buf)
        n, off = struct.unpack(">Q", buf[2:10])[0], 10
    buf = read_exact(s, off + n, buf)
    return opcode, bytes(buf[off:off + n]), buf[off + n:]


def main():
    host, port, ca, cert, key, version = sys.argv[1:7]
    cipher = sys.argv[7] if len(sys.argv) > 7 else None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    v = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ctx.maximum_version = v
    if cipher:
        ctx.set_ciphers(cipher)
    raw = socket.create_connection((host, int(port)), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    key_b64 = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /openssl HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key_b64}\r\n"
               f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        buf = read_exact(s, len(buf) + 1, buf)
    head, rest = bytes(buf).split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 101"), lines[0]
    expect = base64.b64encode(hashlib.sha1((key_b64 + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    assert any(l.lower() == f"sec-websocket-accept: {expect}".lower() for l in lines), lines
    buf = bytearray(rest)
    text = f"hello from OpenSSL over {s.cipher()[0]}"
    s.sendall(frame(1, text.encode()))
    op, got, buf = read_frame(s, buf)
    assert op == 1, op
    big = bytes((i * 7) & 0xFF for i in range(100_000))
    s.sendall(frame(2, big))
    op, got_big, buf = read_frame(s, buf)
    s.sendall(frame(8, struct.pack(">H", 1000)))
    op_close, close_payload, buf = read_frame(s, buf)
    print(json.dumps({
        "version": s.version(),
        "cipher": s.cipher()[0],
        "text": got.decode(),
        "sent_text": text,
        "binary_ok": op == 2 and got_big == big,
        "close_code": struct.unpack(">H", close_payload[:2])[0] if op_close == 8 and len(close_payload) >= 2 else None,
    }))


if __name__ == "__main__":
    main()
