"""Protocol classification of a flow's first bytes (TLS SNI/ALPN, HTTP Host, QUIC, STUN ...).

Pure parsers only: no sockets, clocks or logging. Filled in by the sniff-layer work (issue 4).
"""

__all__: list[str] = []
