"""Every TCP listener kind fuzzed from outside with mutated real handshakes: SOCKS5 and SOCKS4a, HTTP
(plain and CONNECT), TLS ClientHellos (curl's and Chromium's), PROXY v1/v2 headers, TLS towards the
mesh listener, and admin API requests. The gate never dies, logs no traceback, and its descriptor
count returns to baseline.

Mutations are seeded (``UGATE_FUZZ_SEED``, default fixed) so a failure replays; ``UGATE_FUZZ_CASES``
raises the number per listener for longer runs (scripts/fuzz).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sniff import proxy_protocol
from tests.conftest import ROOT, free_port

SEED = int(os.environ.get("UGATE_FUZZ_SEED", "20261129"))
CASES = int(os.environ.get("UGATE_FUZZ_CASES", "120"))  # per listener kind
FIXTURES = ROOT / "tests" / "sniff" / "fixtures"


def seeds() -> dict[str, list[bytes]]:
    """Real first flights of each protocol, by the listener they are meant for."""
    echo = struct.pack("!H", 9)
    socks5 = b"\x05\x01\x00" + b"\x05\x01\x00\x03\x0bexample.com" + echo
    socks5_ip = b"\x05\x02\x00\x02" + b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo
    socks5_v6 = b"\x05\x01\x00" + b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01" + echo
    socks4a = b"\x04\x01" + echo + b"\x00\x00\x00\x01user\x00example.com\x00"
    http = [b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            b"POST http://example.com/ HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"]
    tls = [(FIXTURES / name).read_bytes() for name in ("curl_https.bin", "chromium_tls.bin", "openssl_sni_alpn.bin")]
    pp = [proxy_protocol.build_v1(("10.0.0.1", 1234), ("10.0.0.2", 80)) + http[0],
          proxy_protocol.build_v2(("10.0.0.1", 1234), ("10.0.0.2", 80)) + tls[0],
          proxy_protocol.build_v2(("fd00::1", 1234), ("fd00::2", 443)) + b"x"]
    admin = [b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /flows HTTP/1.1\r\nHost: x\r\n\r\n",
             b"DELETE /flows/1-2 HTTP/1.1\r\nHost: x\r\n\r\n", b"POST /reload HTTP/1.1\r\nHost: x\r\n\r\n",
             b"GET /route?listener=socks&dst=127.0.0.1:9&sni=a&alpn=h2 HTTP/1.1\r\nHost: x\r\n\r\n"]
    return {"socks": [socks5, socks5_ip, socks5_v6, socks4a], "http": http, "sni": tls,
            "mux": [socks5, socks4a, *http, *tls, b"SSH-2.0-OpenSSH_9.2\r\n"], "pp": pp, "mesh": tls, "admin": admin}


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to four random edits of ``data``: flipped bits, replaced, inserted, duplicated or cut bytes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        at = rng.randrange(len(out) + 1)
        if op == 0 and out:
            i = min(at, len(out) - 1)
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[min(at, len(out) - 1)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            out[at:at] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:
            out[at:at] = out[at: at + rng.randint(1, 64)]
        elif op == 4:
            del out[at:]
        else:
            out[at: at + 2] = struct.pack("!H", rng.choice((0, 1, 0xFFFF, rng.randrange(65536))))
    return bytes(out)


def fds(pid: int) -> dict[str, str]:
    """The process's descriptors and what each is (socket:[inode], pipe:[...], a path)."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return found


def exchange(port: int, data: bytes, answer: bool) -> None:
    """Send ``data``; with ``answer``, half-close and read what comes (briefly); else just close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(data)
            if answer:
                s.shutdown(socket.SHUT_WR)
                s.settimeout(0.5)
                while s.recv(4096):
                    pass
        except (OSError, TimeoutError):
            pass  # reset, refused, or a protocol waiting for more: all fine; the gate is judged after


def keygen(directory: Path) -> None:
    subprocess.run([sys.executable, "-m", "gate", "keygen", "--dir", str(directory)], cwd=ROOT, check=True,
                   capture_output=True)


def test_mutated_handshakes_never_break_the_gate(start_gate: Any, tmp_path: Path) -> None:
    keygen(tmp_path / "me")
    ports = {name: free_port() for name in ("socks", "http", "sni", "mux", "pp", "mesh", "admin")}
    gate = start_gate(
        [{"name": "socks", "kind": "socks5", "listen": f"127.0.0.1:{ports['socks']}"},
         {"name": "http", "kind": "http", "listen": f"127.0.0.1:{ports['http']}"},
         {"name": "sni", "kind": "sni", "listen": f"127.0.0.1:{ports['sni']}", "default": "127.0.0.1:9"},
         {"name": "mux", "kind": "mux", "listen": f"127.0.0.1:{ports['mux']}", "default": "127.0.0.1:9"},
         {"name": "pp", "kind": "forward", "listen": f"127.0.0.1:{ports['pp']}", "to": "127.0.0.1:9",
          "sniff": True, "proxy_protocol_from": ["127.0.0.0/8"]},
         {"name": "mesh", "kind": "h2", "listen": f"127.0.0.1:{ports['mesh']}"},
         {"name": "admin", "kind": "admin", "listen": f"127.0.0.1:{ports['admin']}", "auth": "none"}],
        # only the local discard port may be reached (refused: nothing listens), names are rejected
        # before any lookup, so mutated destinations cost no DNS and no connect timeouts
        routes=[{"match": {"dst": ["127.0.0.1/32"], "port": [9]}, "action": "direct"}, {"action": "reject"}],
        timeouts={"handshake": 1, "connect": 2, "idle": 5, "drain": 1, "sniff": 0.2},
        mesh={"identity": str(tmp_path / "me"), "ca": str(tmp_path / "me" / "cert.pem")},
    )
    for name, flights in seeds().items():  # warm up: what the process opens once (its thread pool's
        for data in flights:              # /dev/null, ...) is not a leak
            exchange(ports[name], data, answer=True)
    time.sleep(1.5)
    baseline, before = gate.fd_count(), fds(gate.proc.pid)
    rng = random.Random(SEED)
    sent = 0
    for name, flights in seeds().items():
        for i in range(CASES):
            exchange(ports[name], mutate(rng, rng.choice(flights)), answer=bool(i % 2))
            sent += 1
    assert gate.alive(), gate.stderr()[-3000:]
    deadline = time.monotonic() + 10
    while gate.fd_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gate.fd_count() <= baseline, sorted(set(fds(gate.proc.pid).items()) - set(before.items()))
    log = gate.stderr()
    assert "Traceback" not in log and "bug while serving" not in log, log[-4000:]
    assert sent == CASES * len(seeds())
