"""The gate-to-gate mesh: identities, mutual TLS, HTTP/2 CONNECT tunnels (dialer and h2 listener)."""
