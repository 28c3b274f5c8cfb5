"""WireGuard peers' endpoints found by ICE, signalled over the mesh, on a UDP port shared with WireGuard."""

__all__: list[str] = []
