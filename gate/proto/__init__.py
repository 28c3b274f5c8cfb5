"""Pure (sans-IO) codecs of the handshakes listeners speak."""

__all__: list[str] = []
