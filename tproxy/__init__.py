"""Transparent capture: socket options (IP_TRANSPARENT, SO_ORIGINAL_DST, SO_MARK), capture rule sets
built as data and applied/cleared (nftables, python-iptables, pyroute2), and namespace topologies."""

__all__: list[str] = []
