"""The app behind an ingress sidecar in namespace tests: an HTTP server (dual-stack, port argv[1]) that
writes each connection's peer address to stdout, one JSON line per request, and answers
``GET /`` with "you are <host> <port>" and ``GET /payload`` with PAYLOAD (5 MB and some, seeded)."""

from __future__ import annotations

import http.server
import json
import random
import socket
import sys

PAYLOAD = random.Random(20261129).randbytes(5 * 1024 * 1024 + 77)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        host, port = self.client_address[0].removeprefix("::ffff:"), self.client_address[1]
        print(json.dumps({"peer": host, "port": port, "path": self.path}), flush=True)
        body = PAYLOAD if self.path == "/payload" else f"you are {host} {port}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class DualStack(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


if __name__ == "__main__":
    DualStack(("::", int(sys.argv[1])), Handler).serve_forever()
