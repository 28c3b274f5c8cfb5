"""The ``ugate`` command: run the gateway, check a config, or explain a routing decision."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
import tomllib
from pathlib import Path

from gate.addr import is_ip
from gate.config import GateConfig, load_config
from gate.errors import ConfigError
from gate.router import FlowKey, Router

__all__ = ["main", "version"]

EXIT_CONFIG = 2


def version(dist: str = "ugate") -> str:
    """The installed distribution's version; from a source tree that is not installed, pyproject's."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        with (Path(__file__).resolve().parents[1] / "pyproject.toml").open("rb") as f:
            return str(tomllib.load(f)["project"]["version"])


DEFAULT_CONFIG = "configs/gate.yaml"


def _options(defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes. Only the top parser has defaults: a subcommand's parser writes its
    defaults over what the top parser read, so there they are SUPPRESSed (absent unless given), and
    ``ugate --config X check`` and ``ugate check --config X`` mean the same."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=DEFAULT_CONFIG if defaults else argparse.SUPPRESS,
                        help=f"YAML config (default: {DEFAULT_CONFIG})")
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        default=None if defaults else argparse.SUPPRESS, help="overrides log.level of the config")
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ugate", parents=[_options(defaults=True)],
                                     description="Transparent TCP gateway: SOCKS5/4a, HTTP proxy, forwards.")
    parser.add_argument("--version", action="version", version=f"ugate {version()}")
    common = _options(defaults=False)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", parents=[common], help="run the gateway (the default)")
    sub.add_parser("check", parents=[common], help="validate the config; exit 2 listing every problem")
    route = sub.add_parser("route", parents=[common], help="explain which route a flow would take")
    route.add_argument("--listener", required=True, help="name of the listener the flow arrives on")
    route.add_argument("--dst", required=True, help="requested/original destination: IP or host name")
    route.add_argument("--port", type=int, required=True, help="destination port")
    route.add_argument("--src", default=None, help="client address")
    route.add_argument("--host", default=None, help="requested name (SOCKS domain, CONNECT authority, Host)")
    route.add_argument("--protocol", default=None, help="sniffed protocol (tls, http, h2c, ssh, socks, unknown)")
    route.add_argument("--sni", default=None, help="sniffed TLS server name")
    route.add_argument("--alpn", default="", help="sniffed ALPN offers, comma-separated")
    rules = sub.add_parser("rules", parents=[common], help="firewall/routing rules of the capture section")
    rules.add_argument("action", choices=["show", "apply", "clear"])
    imports = sub.add_parser("import", help="turn other tools' configs into ugate's (prints YAML)")
    imports.add_argument("format", choices=["gateway-api"], help="Kubernetes Gateway API resources (YAML)")
    imports.add_argument("files", nargs="+", help="YAML files, multi-document allowed")
    imports.add_argument("--cluster-domain", default="cluster.local", help="Service DNS suffix (default: %(default)s)")
    imports.add_argument("--listen-host", default="0.0.0.0", help="address the listeners bind (default: %(default)s)")
    imports.add_argument("--backend", action="append", default=[], metavar="SERVICE=HOST",
                         help="dial HOST for Service SERVICE (name or namespace/name) instead of its DNS name")
    keygen = sub.add_parser("keygen", help="write a gate identity (key.pem 0600, cert.pem) and print its ID")
    keygen.add_argument("--dir", required=True, help="directory to write key.pem and cert.pem into")
    keygen.add_argument("--namespace", default="default", help="mesh namespace (default: %(default)s)")
    keygen.add_argument("--trust-domain", default="cluster.local", help="mesh trust domain (default: %(default)s)")
    keygen.add_argument("--ca-dir", default=None, help="sign with the mesh CA in this directory (else self-signed)")
    keygen.add_argument("--ca", action="store_true", help="write a mesh CA instead of a gate identity")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    return parser


def _import(args: argparse.Namespace) -> int:
    """Print the converted config (YAML) on stdout and, on stderr, what could not be expressed."""
    import yaml

    from gate.gateway_api import convert

    documents: list[object] = []
    for name in args.files:
        try:
            with open(name, encoding="utf-8") as f:
                documents += list(yaml.safe_load_all(f))
        except (OSError, yaml.YAMLError) as e:
            print(f"import: {name}: {e}", file=sys.stderr)
            return 1
    backends = dict(b.split("=", 1) for b in args.backend if "=" in b)
    done = convert(documents, args.cluster_domain, args.listen_host, backends)
    for line in done.reports:
        print(f"# {line}", file=sys.stderr)
    if not done.listeners:
        print("import: nothing ugate can serve was found", file=sys.stderr)
        return 1
    print(f"# imported from {', '.join(args.files)} by ugate import gateway-api")
    print(yaml.safe_dump(done.config(), sort_keys=False), end="")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from gate.mesh.identity import KEY_FILE, keygen

    directory = Path(args.dir)
    if (directory / KEY_FILE).exists() and not args.force:
        print(f"{directory / KEY_FILE} exists; --force replaces it (and the gate's ID with it)", file=sys.stderr)
        return 1
    ca_dir = Path(args.ca_dir) if args.ca_dir else None
    try:
        identity = keygen(directory, args.namespace, args.trust_domain, ca_dir=ca_dir, is_ca=args.ca)
    except (OSError, ValueError) as e:
        print(f"keygen: {e}", file=sys.stderr)
        return 1
    if args.ca:
        print(f"mesh CA written to {directory} (name {identity.name})")
    else:
        print(f"id:   {identity.id}\nname: {identity.name}\nuri:  {identity.uri}\nkey:  {identity.key_file}\n"
              f"cert: {identity.cert_file}" + (f" (signed by {ca_dir})" if ca_dir else " (self-signed)"))
    return 0


def _report(path: str, problems: list[str]) -> None:
    print(f"{path}: invalid configuration:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def _load(path: str) -> GateConfig | None:
    try:
        return load_config(path)
    except ConfigError as e:
        _report(path, e.problems)
        return None


def _explain(config: GateConfig, args: argparse.Namespace) -> int:
    if args.listener not in {spec.name for spec in config.listeners}:
        print(f"no listener is named {args.listener!r}", file=sys.stderr)
        return EXIT_CONFIG
    host = args.host
    if host is None and not is_ip(args.dst):
        host = args.dst
    if host is None and args.sni:
        host = args.sni
    alpn = tuple(a for a in args.alpn.split(",") if a)
    key = FlowKey(args.listener, args.src, args.dst, args.port, host, args.protocol, args.sni, alpn)
    from gate.capture import bypass_of, fastpath_of

    kind = next(spec.kind for spec in config.listeners if spec.name == args.listener)
    bypass = kind in ("tproxy", "tproxy_udp") and bool(bypass_of(config))
    fastpath = kind == "tproxy_udp" and bool(fastpath_of(config))
    for line in Router(config.routes).explain(key, bypass=bypass, fastpath=fastpath):
        print(line)
    return 0



def _rules(config: GateConfig, action: str) -> int:
    from gate.capture import rules_of
    from tproxy.rules import apply, clear

    found = rules_of(config)
    if found is None:
        print("the config has no capture section: no rules", file=sys.stderr)
        return EXIT_CONFIG
    cap, rules = found
    if action == "show":
        print(rules.show(), end="")
        return 0
    if action == "apply" and rules.held:
        print("capture.on_failure: open: the rules live as long as the gate that installs them "
              "(apply: auto); `rules apply` would remove them as it exits", file=sys.stderr)
        return EXIT_CONFIG
    try:
        apply(rules, cap) if action == "apply" else clear(cap)
    except OSError as e:
        print(f"rules {action} failed: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keygen":  # needs no config
        return _keygen(args)
    if args.command == "import":  # nor does this
        return _import(args)
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    level = (args.log_level or config.log.level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("pyroute2", "asyncio"):  # their debug output drowns ours
        logging.getLogger(chatty).setLevel(max(logging.getLogger().level, logging.WARNING))
    if args.command == "check":
        from gate.preflight import preflight  # what run loads before it binds: identity, certificates, contexts

        problems = preflight(config)
        if problems:
            _report(args.config, problems)
            return EXIT_CONFIG
        print(f"{args.config}: ok ({len(config.listeners)} listeners, {len(config.routes)} routes)")
        return 0
    if args.command == "route":
        return _explain(config, args)
    if args.command == "rules":
        return _rules(config, args.action)
    from gate.app import run  # uvloop is only needed to run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
