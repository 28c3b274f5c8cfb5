"""HTTP/2 fuzzed on the mesh listener after the TLS handshake: a certified peer sends mutated frame
sequences taken from a real h2 client session (CONNECT, DATA, PING, SETTINGS, WINDOW_UPDATE, RST_STREAM,
a header block in CONTINUATIONs, GOAWAY). Gate B answers with whole HTTP/2 frames or closes; it never
dies, logs no traceback, and its descriptors return to baseline.

Seeded like tests/e2e/test_fuzz.py (``UGATE_FUZZ_SEED``, ``UGATE_FUZZ_CASES``) so a failure replays.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import time
from collections import Counter

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings

from tests.e2e import test_mesh_abuse as abuse
from tests.e2e.test_fuzz import mutate
from tests.e2e.test_mesh_abuse import Target, Upstream, serves_a_normal_flow, wait_for

SEED = int(os.environ.get("UGATE_FUZZ_SEED", "20261129"))
CASES = int(os.environ.get("UGATE_FUZZ_CASES", "150"))
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
gate_b, upstream = abuse.gate_b, abuse.upstream  # the abuse tests' gate B and counting upstream, as fixtures


def client_frames(port: int) -> list[bytes]:
    """A real client session after the preface, cut into its frames."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.increment_flow_control_window(1 << 20)
    headers = [(":method", "CONNECT"), (":authority", f"127.0.0.1:{port}"), ("ugate-client", "127.0.0.1:5555"),
               ("ugate-hops", "1")]
    conn.send_headers(1, headers)
    conn.send_data(1, b"ping")
    conn.ping(b"12345678")
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    conn.send_headers(3, [*headers, ("ugate-host", "x" * 20000)])  # over 16 KiB: HEADERS + CONTINUATION
    conn.increment_flow_control_window(4096, stream_id=3)
    conn.reset_stream(3, h2.errors.ErrorCodes.CANCEL)
    conn.end_stream(1)
    conn.close_connection()
    wire = conn.data_to_send()[len(PREFACE):]
    frames, pos = [], 0
    while pos < len(wire):
        end = pos + 9 + int.from_bytes(wire[pos:pos + 3], "big")
        frames.append(wire[pos:end])
        pos = end
    return frames


def mutate_frames(rng: random.Random, frames: list[bytes]) -> bytes:
    """Frame-level edits (drop, repeat, swap, another type, flags, stream or length) or byte-level ones."""
    out = list(frames[:rng.randint(1, len(frames))])
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(out))
        head, body = bytearray(out[i][:9]), out[i][9:]
        op = rng.randrange(7)
        if op == 0 and len(out) > 1:
            del out[i]
            continue
        if op == 1:
            out.insert(i, out[i] * rng.randint(1, 50))
            continue
        if op == 2:
            j = rng.randrange(len(out))
            out[i], out[j] = out[j], out[i]
            continue
        if op == 3:
            head[3] = rng.randrange(12)
        elif op == 4:
            head[4] = rng.randrange(256)
        elif op == 5:
            head[5:9] = struct.pack("!I", rng.choice((0, 1, 2, 3, 5, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(1 << 32))))
        else:
            head[0:3] = rng.randrange(1 << 24 if rng.random() < 0.2 else 64).to_bytes(3, "big")
        out[i] = bytes(head) + body
    wire = b"".join(out)
    return mutate(rng, wire) if rng.random() < 0.3 else wire


def frame_types(answer: bytes) -> list[int]:
    """The types of the whole frames in ``answer`` (a frame cut by the connection's end is left out)."""
    types, pos = [], 0
    while pos + 9 <= len(answer):
        end = pos + 9 + int.from_bytes(answer[pos:pos + 3], "big")
        if end > len(answer):
            break
        types.append(answer[pos + 3])
        pos = end
    return types


def exchange(target: Target, data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """Handshake as the peer, send the preface and ``data``, read B's answer for a moment; the outcome
    is "closed" (B ended the connection) or "open" (B waits for more), with what B sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(target.certs / "cert.pem", target.certs / "key.pem")
    answer, outcome = b"", "open"
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", target.port), timeout=5)) as tls:
        try:
            tls.sendall(PREFACE + data)
            tls.settimeout(0.3)
            while chunk := tls.recv(1 << 16):
                answer += chunk
            outcome = "closed"
        except TimeoutError:
            pass
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            outcome = "closed"
        if rng.random() < 0.3:  # end some with a reset rather than a close
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return outcome, answer


def test_mutated_http2_never_breaks_the_mesh_listener(gate_b: Target, upstream: Upstream) -> None:
    b = gate_b.gate
    frames = client_frames(upstream.port)
    rng = random.Random(SEED)
    exchange(gate_b, b"".join(frames), rng)  # warm up: what the process opens once is not a leak
    serves_a_normal_flow(gate_b, upstream)
    time.sleep(1.5)
    baseline = b.fd_count()
    outcomes: Counter[str] = Counter()
    for _ in range(CASES):
        outcome, answer = exchange(gate_b, mutate_frames(rng, frames), rng)
        types = frame_types(answer)
        assert answer == b"" or types[:1] == [0x4], f"B's answer does not open with SETTINGS: {answer[:64]!r}"
        assert all(t <= 0x9 for t in types), f"B sent an unknown frame type: {types}"
        outcomes[outcome + (" goaway" if 0x7 in types else "")] += 1
    print(f"outcomes: {dict(outcomes)}")
    assert b.alive(), b.stderr()[-3000:]
    assert outcomes["closed goaway"] > CASES // 4, outcomes  # the mutations reach the HTTP/2 layer
    assert wait_for(lambda: upstream.open == 0, 10), f"{upstream.open} upstream sockets still open"
    assert wait_for(lambda: b.fd_count() <= baseline, 10), f"B holds {b.fd_count() - baseline} descriptors more"
    log = b.stderr()
    assert "Traceback" not in log and "bug while serving" not in log, log[-4000:]
    serves_a_normal_flow(gate_b, upstream)
