#!/usr/bin/env python3
"""Capture the first bytes real clients send: the sniff tests' fixtures (tests/sniff/fixtures/*.bin).

    cd tests/sniff/fixtures && python3 ../../../scripts/capture_sniff_fixtures.py    (needs openssl, curl, ssh)

With Debian's chromium installed, Chromium's TLS ClientHello and QUIC first flight are captured too
(headless, every name mapped to 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

Client = list[str] | Callable[[int], None]


def capture(name: str, client: Client) -> None:
    """Start ``client`` against a local port and keep what it sends first (until it waits for us)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    proc = None
    if callable(client):
        threading.Thread(target=client, args=(port,), daemon=True).start()
    else:
        argv = [arg.replace("PORT", str(port)) for arg in client]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conn, _ = server.accept()
    conn.settimeout(1)
    data = b""
    with contextlib.suppress(TimeoutError):
        while len(data) < 65536 and (chunk := conn.recv(65536)):
            data += chunk
    conn.close()
    server.close()
    if proc is not None:
        proc.kill()
        proc.wait()
    Path(name).write_bytes(data)
    print(name, len(data))


def capture_udp(name: str, client: list[str]) -> None:
    """The first datagram ``client`` sends to a local UDP port."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(3)
    argv = [arg.replace("PORT", str(server.getsockname()[1])) for arg in client]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data, _ = server.recvfrom(65535)
    proc.kill()
    proc.wait()
    server.close()
    Path(name).write_bytes(data)
    print(name, len(data))


CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--host-resolver-rules=MAP * 127.0.0.1"]


def chromium_tls(name: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        capture(name, [*CHROMIUM, f"--user-data-dir={profile}", "--disable-quic", "https://www.example.test:PORT/"])


def chromium_quic(name: str) -> None:
    """Chromium's first datagrams to a QUIC-only origin, length-prefixed (2 bytes) as quic_initials'."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([*CHROMIUM, f"--user-data-dir={profile}", "--enable-quic",
                                 f"--origin-to-force-quic-on=www.example.test:{port}", f"https://www.example.test:{port}/"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server.settimeout(20)
        first, peer = server.recvfrom(65535)
        got = [first]
        server.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            while len(got) < 4:
                data, sender = server.recvfrom(65535)
                if sender == peer:
                    got.append(data)
        proc.kill()
        proc.wait()
    server.close()
    Path(name).write_bytes(b"".join(len(d).to_bytes(2, "big") + d for d in got))
    print(name, [len(d) for d in got])


def quic_initials(name: str, alpn: list[str], version: int | None = None) -> None:
    """The first datagrams of an aioquic client (pip install aioquic), length-prefixed (2 bytes)."""
    import asyncio

    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    async def run() -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        config = QuicConfiguration(is_client=True, alpn_protocols=alpn, server_name="quic.example.test")
        if version is not None:
            config.supported_versions = [version]

        async def client() -> None:
            with contextlib.suppress(Exception):
                async with connect("127.0.0.1", server.getsockname()[1], configuration=config):
                    pass

        task = asyncio.ensure_future(asyncio.wait_for(client(), 1.5))
        got: list[bytes] = []
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0
        while loop.time() < end:
            try:
                got.append(server.recv(65535))
            except BlockingIOError:
                await asyncio.sleep(0.01)
        await asyncio.gather(task, return_exceptions=True)
        Path(name).write_bytes(b"".join(len(d).to_bytes(2, "big") + d for d in got[:4]))
        print(name, [len(d) for d in got[:4]])

    asyncio.run(run())


def python_ssl(port: int) -> None:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with contextlib.suppress(OSError):
        ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="python.example.test")


if __name__ == "__main__":
    s_client = ["openssl", "s_client", "-connect", "127.0.0.1:PORT"]
    capture("openssl_sni_alpn.bin", [*s_client, "-servername", "example.test", "-alpn", "h2,http/1.1"])
    capture("openssl_tls12_nosni.bin", [*s_client, "-noservername", "-tls1_2"])
    capture("curl_https.bin", ["curl", "-sk", "--max-time", "2", "--resolve", "www.example.test:PORT:127.0.0.1",
                               "https://www.example.test:PORT/"])
    capture("python_ssl.bin", python_ssl)
    capture("curl_http.bin", ["curl", "-s", "--max-time", "2", "http://127.0.0.1:PORT/path?q=1",
                              "-H", "Host: web.example.test"])
    capture("curl_h2c_prior.bin", ["curl", "-s", "--max-time", "2", "--http2-prior-knowledge", "http://127.0.0.1:PORT/"])
    capture("ssh_banner.bin", ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-p", "PORT",
                               "127.0.0.1"])
    capture_udp("dig_query.bin", ["dig", "@127.0.0.1", "-p", "PORT", "WWW.Example.test", "AAAA", "+tries=1", "+time=1"])
    capture_udp("openssl_dtls.bin", ["openssl", "s_client", "-dtls1_2", "-connect", "127.0.0.1:PORT",
                                     "-servername", "dtls.example.test"])
    quic_initials("aioquic_initial.bin", ["h3"])
    quic_initials("aioquic_initial_split.bin", ["h3"] + [f"proto-{i:04d}-padding-padding" for i in range(60)])
    quic_initials("aioquic_initial_v2.bin", ["h3"], 0x6B3343CF)
    if shutil.which("chromium"):
        chromium_tls("chromium_tls.bin")
        chromium_quic("chromium_quic_initial.bin")
    else:
        print("no chromium: its fixtures are left as they are")
