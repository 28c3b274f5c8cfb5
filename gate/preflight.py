"""Everything ``run`` loads before it binds a port, built once to find problems: ``ugate check`` and ``run``
both call ``preflight``, so no config passes check and then fails at start.
"""

from __future__ import annotations

import ssl

from gate.config import AdminSpec, GateConfig, H2Spec
from gate.errors import ConfigError

__all__ = ["check_ready", "preflight"]


def _why(e: Exception) -> str:
    return "; ".join(e.problems) if isinstance(e, ConfigError) else (getattr(e, "strerror", None) or str(e))


def preflight(config: GateConfig) -> list[str]:
    """Located problems (``where: what``) of the trust material: identity, mesh CA and peer certificates,
    the server context of each h2 listener and the client context of each dialled peer."""
    problems = _admin_tokens(config)
    if config.mesh is None:
        return problems
    from gate.mesh.trust import Trust  # the mesh (h2, cryptography) is only loaded for configs that use it

    try:
        trust = Trust(config.mesh, config.peers)
    except ConfigError as e:
        return problems + list(e.problems)
    for i, spec in enumerate(config.listeners):
        if isinstance(spec, H2Spec):
            try:
                trust.server_context()
            except (ConfigError, ssl.SSLError, OSError) as e:
                problems.append(f"listeners[{i}] ({spec.name}): {_why(e)}")
    for i, peer in enumerate(config.peers):
        if peer.address is not None:
            try:
                trust.client_context(peer, reverse=peer.reverse)
            except (ConfigError, ssl.SSLError, OSError) as e:
                problems.append(f"peers[{i}] ({peer.name}): {_why(e)}")
    return problems


def _admin_tokens(config: GateConfig) -> list[str]:
    """Each admin listener's token can be read (and is long enough)."""
    from gate.admin.api import load_token

    problems = []
    for i, spec in enumerate(config.listeners):
        if isinstance(spec, AdminSpec):
            try:
                load_token(spec)
            except ConfigError as e:
                problems += [f"listeners[{i}] ({spec.name}): {p}" for p in e.problems]
    return problems


def check_ready(config: GateConfig) -> None:
    """``preflight`` for ``run``: ConfigError listing the problems, if any."""
    problems = preflight(config)
    if problems:
        raise ConfigError(problems)
