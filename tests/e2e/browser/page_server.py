"""The test page's own server (run by tests/e2e/test_webrtc_chromium.py inside the client namespace):
GET / serves peer.html, POST /result writes the page's report to the file named on the command line."""

from __future__ import annotations

import http.server
import sys
from pathlib import Path

PAGE = (Path(__file__).parent / "peer.html").read_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def do_POST(self) -> None:
        body = self.rfile.read(min(int(self.headers.get("Content-Length", "0")), 1 << 20))
        Path(sys.argv[3]).write_bytes(body)
        self.send_response(204)
        self.end_headers()


if __name__ == "__main__":
    http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
