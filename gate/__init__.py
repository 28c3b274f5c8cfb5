"""ugate: a transparent TCP gateway (listeners, routing, upstream dialing, access log)."""

__all__: list[str] = []
