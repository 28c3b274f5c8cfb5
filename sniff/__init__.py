"""Protocol classification of a flow's first bytes (TLS SNI/ALPN/ECH, HTTP Host, h2c, SSH, SOCKS).

Pure parsers only: no sockets, clocks or logging. Each returns a frozen result, NEED_MORE, or raises
NotThisProtocol; ``classify`` tries them all within a bounded number of bytes.
"""

from sniff import proxy_protocol
from sniff.classify import MAX_SNIFF, Sniffed, classify, classify_datagrams
from sniff.result import NEED_MORE, NeedMore, NotThisProtocol

__all__ = ["MAX_SNIFF", "NEED_MORE", "NeedMore", "NotThisProtocol", "Sniffed", "classify", "classify_datagrams",
           "proxy_protocol"]
