"""The compiled router (gate.route_index) against the plain linear reading of the same routes: they must
agree on every decision, on needs_sniff, and with explain, for random rule sets and flows drawn from a
small universe (so conditions overlap, touch and nest, and flows land on their edges)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.route_index import Intervals, Names, address
from gate.route_spec import Match, Route
from gate.router import FlowKey, Router, _ip, decide_linear, needs_sniff_linear
from gate.vocab import Action
from tests.fuzzing import budget

V4 = int(ipaddress.IPv4Address("10.0.0.0"))
V6 = int(ipaddress.IPv6Address("fd00::"))
LABELS = ["a", "b", "xn--c"]


def _v4_net(offset: int, prefix: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network((V4 + offset, prefix), strict=False)


def _v6_net(offset: int, prefix: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network((V6 + offset, prefix), strict=False)


nets = st.one_of(st.builds(_v4_net, st.integers(0, 63), st.integers(24, 32)),
                 st.builds(_v6_net, st.integers(0, 63), st.integers(120, 128)),
                 st.sampled_from([ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"),
                                  ipaddress.ip_network("10.0.0.0/8")]))
names = st.lists(st.sampled_from(LABELS), min_size=1, max_size=3).map(".".join)
patterns = st.tuples(st.sampled_from(["", "*.", "."]), names).map("".join)
port_ranges = st.tuples(st.integers(1, 12), st.integers(0, 4)).map(lambda t: (t[0], t[0] + t[1]))


def _match(listener: Any, dst: Any, port: Any, src: Any, host: Any, protocol: Any, sni: Any, alpn: Any) -> Match:
    return Match(listener=tuple(listener), dst=tuple(dst), port=tuple(port), src=tuple(src), host=tuple(host),
                 protocol=tuple(protocol), sni=tuple(sni), alpn=tuple(alpn))


def maybe(items: st.SearchStrategy[Any], size: int = 3) -> st.SearchStrategy[list[Any]]:
    """Mostly no condition (as in real configs), else a few items."""
    return st.one_of(st.just([]), st.lists(items, min_size=1, max_size=size))


matches = st.builds(_match, maybe(st.sampled_from(["l1", "l2", "l3"])), maybe(nets, 6), maybe(port_ranges),
                    maybe(nets), maybe(patterns, 5), maybe(st.sampled_from(["tls", "http", "ssh"])),
                    maybe(patterns), maybe(st.sampled_from(["h2", "http/1.1"])))
actions = st.sampled_from([Action.DIRECT, Action.REJECT, Action.RESOLVE])


@st.composite
def rule_sets(draw: st.DrawFn) -> tuple[Route, ...]:
    items = draw(st.lists(st.tuples(matches, actions), min_size=0, max_size=12))
    return tuple(Route(index=i, name=f"r{i}", match=m, action=a) for i, (m, a) in enumerate(items))


def _v4(offset: int) -> str:
    return str(ipaddress.IPv4Address(V4 + offset))


def _v6(offset: int) -> str:
    return str(ipaddress.IPv6Address(V6 + offset))


addresses = st.one_of(st.integers(0, 70).map(_v4), st.integers(0, 70).map(_v6),
                      st.integers(0, 70).map(lambda o: f"::ffff:{_v4(o)}"),
                      st.sampled_from(["1.2.3.4", "2001:db8::1", "010.0.0.1", "fd00::1%eth0", "10.0.0.1 "]))
odd_names = st.one_of(names, names, names, names.map(str.upper), names.map(lambda n: n + "."), st.just("a..b"),
                      st.just(""), st.text(alphabet="ab.*", max_size=6))
flows = st.builds(FlowKey, st.sampled_from(["l1", "l2", "l4"]), st.none() | addresses,
                  st.none() | addresses | odd_names, st.none() | st.integers(0, 18), st.none() | odd_names,
                  st.none() | st.sampled_from(["tls", "http", "ssh", "unknown"]), st.none() | odd_names,
                  st.lists(st.sampled_from(["h2", "http/1.1", "h3"]), max_size=2).map(tuple))


@budget(300)
@given(rule_sets(), st.lists(flows, min_size=1, max_size=8))
def test_compiled_router_agrees_with_the_linear_reference(routes: tuple[Route, ...], keys: list[FlowKey]) -> None:
    router = Router(routes)
    for key in keys:
        decision = router.decide(key)
        assert decision == decide_linear(routes, key)
        assert router.needs_sniff(key) is needs_sniff_linear(routes, key)
        last = router.explain(key)[-1]
        if decision.route is None:
            assert last == "no route matched: reject"
        else:
            assert last.startswith(f"routes[{decision.route.index}] {decision.route.name}: MATCH: ")


@budget(300)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(0, 5)), max_size=30),
       st.lists(st.integers(-2, 45), min_size=1, max_size=20))
def test_intervals_give_each_value_the_routes_covering_it(ranges: list[tuple[int, int, int]],
                                                            values: list[int]) -> None:
    spans = [(min(a, b), max(a, b), pos) for a, b, pos in ranges]
    table = Intervals(spans)
    assert len(table) <= 2 * len(spans)
    for value in values:
        expected = 0
        for lo, hi, pos in spans:
            if lo <= value <= hi:
                expected |= 1 << pos
        assert table.lookup(value) == expected


@budget(500)
@given(st.one_of(st.text(max_size=40), st.text(alphabet="0123456789abcdef:.%f", max_size=40),
                 st.ip_addresses().map(str), st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}")))
def test_address_reads_text_as_ipaddress_does(text: str) -> None:
    reference = _ip(text)
    assert address(text) == (None if reference is None else (reference.version, int(reference)))


@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.0.1", (4, V4 + 1)), ("::ffff:10.0.0.1", (4, V4 + 1)), ("fd00::1", (6, V6 + 1)),
    ("fe80::1%eth0", (6, int(ipaddress.IPv6Address("fe80::1")))),  # scoped: ipaddress reads it, so do we
    ("010.0.0.1", None), ("10.0.0.1\x00", None), ("example.com", None), ("1.2.3", None), (None, None),
])
def test_address_cases(text: str | None, expected: tuple[int, int] | None) -> None:
    assert address(text) == expected


@pytest.mark.parametrize(("name", "routes"), [
    ("example.com", {0, 2}), ("www.example.com", {1, 2}), ("a.b.example.com", {1, 2}),
    ("badexample.com", set()), ("example.com.evil", set()), ("other.test", {3}), ("x.other.test", set()),
    ("..example.com", {1, 2}),  # empty labels: str.endswith(".example.com") holds, and so here
])
def test_names_by_suffix(name: str, routes: set[int]) -> None:
    table = Names([("example.com", 0), ("*.example.com", 1), (".example.com", 2), ("other.test", 3)])
    assert {pos for pos in range(4) if table.lookup(name) >> pos & 1} == routes


def test_a_long_name_costs_probes_for_the_longest_pattern_only() -> None:
    """A peer-chosen name of thousands of labels still matches as str.endswith says, and only suffixes as
    long as the longest pattern are looked up (counted through a dict that records its probes)."""
    probes: list[str] = []

    class Counting(dict[str, int]):
        def get(self, key: str, default: int = 0) -> int:  # type: ignore[override]
            probes.append(key)
            return super().get(key, default)

    table = Names([("*.ads.example", 0), (".b.test", 1)])
    name = "a." * 5000 + "x.ads.example"
    assert table.lookup(name) == 1
    table._suffix = Counting(table._suffix)
    assert table.lookup(name) == 1 and len(probes) <= len("ads.example")
    assert table.lookup("." * 3000 + "b.test") == 2
