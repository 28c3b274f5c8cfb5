"""``ugate import gateway-api``: Kubernetes Gateway API resources turned into ugate listeners and routes.

Operators describe ingress with Gateway API objects (a Gateway's listeners, TLSRoutes/TCPRoutes/HTTPRoutes
attached to them); this turns what ugate can serve the same way into its config, and reports every
resource, listener, rule or field it cannot express, never dropping one silently:
- a ``TLS`` listener in ``Passthrough`` mode becomes an ``sni`` listener; each TLSRoute a route matching
  its hostnames (``sni``) to its backend;
- a ``TCP`` listener becomes a ``forward`` listener to its TCPRoute's backend;
- an ``HTTP`` listener becomes a sniffing ``forward`` listener whose HTTPRoutes route on the ``Host`` of a
  connection's first request (ugate routes connections; per-request path, header, method or query matches
  and filters cannot be expressed: such rules are skipped and reported, so nothing is routed more widely
  than asked);
- ``HTTPS``, ``TLS`` with ``Terminate`` (ugate never terminates TLS), ``UDP`` (no UDP port-forward kind),
  ``GRPCRoute`` and other kinds are reported, as are traffic splits (the heaviest backend takes all).
What no route matches is rejected, as a Gateway drops it: a final ``reject`` route per imported listener.
Backends are Services: ``NAME.NAMESPACE.svc.CLUSTER_DOMAIN:PORT``, or a host given with ``backends``.
Pure: documents in, (config, reports) out; the CLI reads the files and prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Conversion", "convert"]

ROUTE_KINDS = ("TLSRoute", "TCPRoute", "HTTPRoute", "UDPRoute", "GRPCRoute")
IGNORED_KINDS = {  # kinds that configure nothing ugate serves: reported as ignored, with the reason
    "GatewayClass": "selects a controller; ugate is the controller here",
    "ReferenceGrant": "cross-namespace references are taken as granted",
    "Namespace": "namespaces only name things here",
}
# listener protocol -> ugate listener kind; the route kind each may carry
KIND_OF = {"TLS": ("sni", "TLSRoute"), "TCP": ("forward", "TCPRoute"), "HTTP": ("forward", "HTTPRoute")}


@dataclass
class Conversion:
    """The generated config (``listeners`` and ``routes``, ready for YAML) and what could not be
    expressed, one line each, naming the resource."""

    listeners: list[dict[str, Any]] = field(default_factory=list)
    routes: list[dict[str, Any]] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)

    def config(self) -> dict[str, Any]:
        return {"listeners": self.listeners, "routes": self.routes}


@dataclass
class _Listener:
    """One ugate listener: the Gateway listeners of one gateway on one port (hostnames differ)."""

    name: str
    protocol: str
    port: int
    namespace: str
    sections: dict[str, Mapping[str, Any]]  # Gateway listener name -> its spec
    routes: list[dict[str, Any]] = field(default_factory=list)
    to: str | None = None  # a forward listener's destination: its first route's backend


def _ref(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')} {meta.get('namespace', 'default')}/{meta.get('name', '?')}"


def _namespace(doc: Mapping[str, Any]) -> str:
    return str((doc.get("metadata") or {}).get("namespace") or "default")


def convert(documents: list[Any], cluster_domain: str = "cluster.local", listen_host: str = "0.0.0.0",
            backends: Mapping[str, str] | None = None) -> Conversion:
    """Convert parsed YAML documents (any order; ``None`` documents skipped). ``backends`` maps a Service
    name (``name`` or ``namespace/name``) to the host to dial instead of its cluster DNS name."""
    out = Conversion()
    docs = [d for d in documents if d is not None]
    gateways: dict[tuple[str, str], dict[tuple[str, int], _Listener]] = {}
    for doc in docs:
        if not isinstance(doc, Mapping) or "kind" not in doc:
            out.reports.append(f"skipped: a document that is not a Kubernetes resource ({str(doc)[:60]!r})")
        elif doc["kind"] == "Gateway":
            gateways[(_namespace(doc), str(doc["metadata"]["name"]))] = _gateway(doc, out)
        elif doc["kind"] in IGNORED_KINDS:
            out.reports.append(f"ignored: {_ref(doc)} ({IGNORED_KINDS[doc['kind']]})")
        elif doc["kind"] not in ROUTE_KINDS:
            out.reports.append(f"not expressible: {_ref(doc)} (kind {doc['kind']} has no ugate equivalent)")
    for doc in docs:
        if isinstance(doc, Mapping) and doc.get("kind") in ROUTE_KINDS:
            _attach(doc, gateways, out, _Backends(cluster_domain, backends or {}))
    for listeners in gateways.values():
        for listener in listeners.values():
            _emit(listener, listen_host, out)
    return out


def _gateway(doc: Mapping[str, Any], out: Conversion) -> dict[tuple[str, int], _Listener]:
    name, namespace = str(doc["metadata"]["name"]), _namespace(doc)
    found: dict[tuple[str, int], _Listener] = {}
    for spec in (doc.get("spec") or {}).get("listeners") or []:
        section, protocol, port = spec.get("name"), spec.get("protocol"), spec.get("port")
        where = f"{_ref(doc)} listener {section}"
        tls_mode = (spec.get("tls") or {}).get("mode", "Terminate")
        if protocol == "TLS" and tls_mode != "Passthrough":
            out.reports.append(f"not expressible: {where} (TLS mode {tls_mode}: ugate never terminates TLS)")
        elif protocol not in KIND_OF:
            why = "ugate never terminates TLS" if protocol in ("HTTPS",) else "no ugate listener kind serves it"
            out.reports.append(f"not expressible: {where} (protocol {protocol}: {why})")
        elif not isinstance(port, int) or not 0 < port < 65536:
            out.reports.append(f"invalid: {where} (port {port!r})")
        else:
            key = (protocol, port)
            if key not in found:
                found[key] = _Listener(f"{name}-{section}", protocol, port, namespace, {})
            found[key].sections[str(section)] = spec
    if not found:
        out.reports.append(f"nothing imported from {_ref(doc)}: no listener ugate can serve")
    return found


@dataclass
class _Backends:
    cluster_domain: str
    overrides: Mapping[str, str]

    def address(self, ref: Mapping[str, Any], namespace: str, where: str, out: Conversion) -> str | None:
        kind, name, port = ref.get("kind", "Service"), ref.get("name"), ref.get("port")
        ns = ref.get("namespace", namespace)
        if kind != "Service" or ref.get("group", "") not in ("", "core"):
            out.reports.append(f"not expressible: {where} backend {kind} {name} (only Services)")
            return None
        if not isinstance(port, int):
            out.reports.append(f"invalid: {where} backend {name} (a Service backend needs a port)")
            return None
        host = self.overrides.get(f"{ns}/{name}") or self.overrides.get(str(name))
        host = host or f"{name}.{ns}.svc.{self.cluster_domain}"
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _attach(doc: Mapping[str, Any], gateways: dict[tuple[str, str], dict[tuple[str, int], _Listener]],
            out: Conversion, backends: _Backends) -> None:
    """Attach a route to the listeners its parentRefs name (and that allow it), as ugate routes."""
    kind, namespace, spec = str(doc["kind"]), _namespace(doc), doc.get("spec") or {}
    ref = _ref(doc)
    parents = spec.get("parentRefs") or []
    if not parents:
        out.reports.append(f"not imported: {ref} (no parentRefs: attached to no Gateway)")
        return
    attached = taken = False  # a rule became a route / a listener took the route
    for parent in parents:
        gateway = gateways.get((parent.get("namespace", namespace), parent.get("name")))
        if gateway is None:
            out.reports.append(f"not imported: {ref} (parent Gateway {parent.get('name')} is not among the inputs "
                               "or has no listener ugate serves)")
            continue
        for listener in gateway.values():
            sections = [s for n, s in listener.sections.items() if parent.get("sectionName") in (None, n)
                        and parent.get("port") in (None, listener.port)]
            if not sections or KIND_OF[listener.protocol][1] != kind:
                continue
            if not _allowed(sections[0], kind, namespace, listener.namespace):
                out.reports.append(f"not attached: {ref} to {listener.name} (its allowedRoutes refuse it)")
                continue
            hostnames = _hostnames(spec.get("hostnames") or [], sections, ref, listener, out)
            if hostnames is None:
                continue
            taken = True
            for i, rule in enumerate(spec.get("rules") or []):
                route = _rule(rule, f"{ref} rules[{i}]", namespace, backends, out)
                if route is None:
                    continue
                match: dict[str, Any] = {"listener": [listener.name]}
                if hostnames:
                    match["sni" if kind == "TLSRoute" else "host"] = hostnames
                listener.routes.append({"name": f"{namespace}/{doc['metadata']['name']}#{i}", "match": match,
                                        "upstream": route})
                listener.to = listener.to or route
                attached = True
    if not attached and kind in ("UDPRoute", "GRPCRoute"):
        out.reports.append(f"not expressible: {ref} (no ugate listener serves {kind}s)")
    elif not attached and taken:
        out.reports.append(f"not imported: {ref} (none of its rules can be expressed)")
    elif not attached:
        out.reports.append(f"not imported: {ref} (no listener of its parents takes a {kind})")


def _allowed(section: Mapping[str, Any], kind: str, route_ns: str, gateway_ns: str) -> bool:
    allowed = section.get("allowedRoutes") or {}
    kinds = [k.get("kind") for k in allowed.get("kinds") or []]
    if kinds and kind not in kinds:
        return False
    origin = (allowed.get("namespaces") or {}).get("from", "Same")
    return origin == "All" or (origin == "Same" and route_ns == gateway_ns)  # Selector: labels unknown here


def _hostnames(names: list[str], sections: list[Mapping[str, Any]], ref: str, listener: _Listener,
               out: Conversion) -> list[str] | None:
    """The route's hostnames narrowed by the listener's ``hostname``; None when none is left."""
    listener_names = [s["hostname"] for s in sections if s.get("hostname")]
    if len(listener_names) < len(sections):
        return list(names)  # one of the sections takes any name
    if not names:
        return listener_names
    kept = [n for n in names if any(_within(n, h) for h in listener_names)]
    if not kept:
        out.reports.append(f"not attached: {ref} to {listener.name} (no hostname within {listener_names})")
        return None
    return kept


def _within(name: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and name != pattern[2:]
    return name == pattern


def _rule(rule: Mapping[str, Any], where: str, namespace: str, backends: _Backends, out: Conversion) -> str | None:
    """The backend one rule routes to, or None (reported) when ugate cannot route it the same way."""
    matches = [m for m in rule.get("matches") or [] if m != {"path": {"type": "PathPrefix", "value": "/"}}]
    if matches:
        fields = sorted({k for m in matches for k in m})
        out.reports.append(f"skipped: {where} (matches on {', '.join(fields)}: ugate routes a connection by its "
                           "first request's Host, not per request)")
        return None
    if rule.get("filters"):
        kinds = sorted({f.get("type", "?") for f in rule["filters"]})
        out.reports.append(f"skipped: {where} (filters {', '.join(kinds)}: ugate does not change requests)")
        return None
    refs = [r for r in rule.get("backendRefs") or [] if r.get("weight", 1) != 0]
    if not refs:
        out.reports.append(f"skipped: {where} (no backend with weight > 0)")
        return None
    if len(refs) > 1:
        heaviest = max(refs, key=lambda r: r.get("weight", 1))
        split = "/".join(f"{r.get('name')}={r.get('weight', 1)}" for r in refs)
        out.reports.append(f"not expressible: {where} traffic split {split} (all of it goes to {heaviest.get('name')})")
        refs = [heaviest]
    return backends.address(refs[0], namespace, where, out)


def _emit(listener: _Listener, listen_host: str, out: Conversion) -> None:
    if not listener.routes or listener.to is None:
        out.reports.append(f"not imported: listener {listener.name} (no route attached to it)")
        return
    host = f"[{listen_host}]" if ":" in listen_host else listen_host
    spec: dict[str, Any] = {"name": listener.name, "kind": KIND_OF[listener.protocol][0],
                            "listen": f"{host}:{listener.port}"}
    if spec["kind"] == "forward":
        spec["to"] = listener.to
        if listener.protocol == "HTTP":
            spec["sniff"] = True  # the Host of the first request picks the route
    if listener.protocol == "TCP" and len(listener.routes) > 1:
        unreachable = ", ".join(r["name"] for r in listener.routes[1:])
        out.reports.append(f"not expressible: {unreachable} on {listener.name} (a TCP listener has one backend; "
                           f"{listener.routes[0]['name']} takes every connection)")
    out.listeners.append(spec)
    out.routes.extend(listener.routes)
    out.routes.append({"name": f"{listener.name}-unmatched", "match": {"listener": [listener.name]},
                       "action": "reject"})
