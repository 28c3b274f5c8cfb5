"""Capture the first bytes real clients send, as the sniff tests' fixtures (tests/sniff/fixtures/*.bin).

Run from that folder: python3 ../../../scripts/capture_sniff_fixtures.py (needs openssl, curl, ssh).
"""
import socket, subprocess, sys, time, ssl, threading
def capture(name, argv_or_fn, port_holder):
    srv = socket.create_server(("127.0.0.1", 0)); port = srv.getsockname()[1]
    if callable(argv_or_fn):
        t = threading.Thread(target=argv_or_fn, args=(port,), daemon=True); t.start(); proc = None
    else:
        proc = subprocess.Popen([a.replace("PORT", str(port)) for a in argv_or_fn], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c, _ = srv.accept(); c.settimeout(1); data = b""
    try:
        while len(data) < 65536:
            d = c.recv(65536)
            if not d: break
            data += d
    except socket.timeout: pass
    c.close(); srv.close()
    if proc: proc.kill(); proc.wait()
    open(name, "wb").write(data); print(name, len(data))
capture("openssl_sni_alpn.bin", ["openssl", "s_client", "-connect", "127.0.0.1:PORT", "-servername", "example.test", "-alpn", "h2,http/1.1"], None)
capture("openssl_tls12_nosni.bin", ["openssl", "s_client", "-connect", "127.0.0.1:PORT", "-noservername", "-tls1_2"], None)
capture("curl_https.bin", ["curl", "-sk", "--max-time", "2", "--resolve", "www.example.test:PORT:127.0.0.1", "https://www.example.test:PORT/"], None)
def py(port):
    ctx = ssl.create_default_context(); ctx.set_alpn_protocols(["h2", "http/1.1"])
    try: ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="python.example.test")
    except Exception: pass
capture("python_ssl.bin", py, None)
capture("curl_http.bin", ["curl", "-s", "--max-time", "2", "http://127.0.0.1:PORT/path?q=1", "-H", "Host: web.example.test"], None)
capture("curl_h2c_prior.bin", ["curl", "-s", "--max-time", "2", "--http2-prior-knowledge", "http://127.0.0.1:PORT/"], None)
capture("ssh_banner.bin", ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-p", "PORT", "127.0.0.1"], None)
