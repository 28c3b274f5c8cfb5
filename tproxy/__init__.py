"""Transparent capture: socket options (IP_TRANSPARENT, SO_ORIGINAL_DST, SO_MARK) and firewall/route
rule sets built as data, applied and cleared. Filled in by the transparent-capture work (issue 3)."""

__all__: list[str] = []
