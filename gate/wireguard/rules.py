"""The ``wireguard:`` section's mode-3 rules for ``ugate rules show`` / ``clear`` (tproxy.wg_redirect).

The running gate applies them itself (it must know the interface's listen port, and fills the output map
as ICE selects pairs); the command shows what it would install and clears what a killed gate left.
"""

from __future__ import annotations

from gate.config import GateConfig
from gate.wg_spec import WgMode
from tproxy.wg_redirect import WgRedirect, build

__all__ = ["redirect_of", "show"]


def redirect_of(config: GateConfig, listen_port: int | None = None) -> WgRedirect | None:
    """The mode-3 rule spec, or None (no section, no peers, another mode). ``listen_port`` stands in for
    the interface's when the config does not fix it; None then reads it with ``wg show`` (OSError if not)."""
    spec = config.wireguard
    if spec is None or spec.interface is None or not spec.peers or spec.mode != WgMode.NFTABLES:
        return None
    port = spec.listen_port or listen_port
    if port is None:
        from gate.wireguard.wgtool import show as wg_show

        port = wg_show(spec.interface).listen_port
    return WgRedirect(port, tuple(p.ice_port for p in spec.peers))


def show(config: GateConfig) -> str | None:
    try:
        redirect = redirect_of(config)
    except OSError as e:
        return f"# wireguard: cannot read the interface's listen port ({e}); the gate reads it at start\n"
    if redirect is None:
        return None
    return ("# nftables, wireguard mode 3 (installed by the running gate; out4/out6 filled as ICE selects pairs)\n"
            + build(redirect))
