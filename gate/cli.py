"""The ``ugate`` command: run the gateway, check a config, or explain a routing decision."""

from __future__ import annotations

import argparse
import logging
import sys

from gate.addr import is_ip
from gate.config import GateConfig, load_config
from gate.errors import ConfigError
from gate.router import FlowKey, Router

__all__ = ["main"]

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default="configs/gate.yaml", help="YAML config (default: %(default)s)")
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="overrides log.level of the config")
    parser = argparse.ArgumentParser(prog="ugate", parents=[common],
                                     description="Transparent TCP gateway: SOCKS5/4a, HTTP proxy, forwards.")
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
    return parser


def _load(path: str) -> GateConfig | None:
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"{path}: invalid configuration:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
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
    for line in Router(config.routes).explain(key):
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
    try:
        apply(rules, cap) if action == "apply" else clear(cap)
    except OSError as e:
        print(f"rules {action} failed: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    level = (args.log_level or config.log.level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("pyroute2", "asyncio"):  # their debug output drowns ours
        logging.getLogger(chatty).setLevel(max(logging.getLogger().level, logging.WARNING))
    if args.command == "check":
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
