"""Routes that take their lists from files (dst_from, host_from): read relative to the config file, bad
lines located as FILE:LINE, size bounds, explain on long lists, and the capture rules they compile to."""

from __future__ import annotations

import ipaddress
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gate import route_lists
from gate.capture import bypass_of, rules_of
from gate.config import load_config, parse_config
from gate.errors import ConfigError
from gate.router import FlowKey, Router, bypass_routes
from gate.validate import host_pattern, network
from tests.conftest import ROOT
from tests.fuzzing import budget
from tproxy.offload import SET_ABOVE

LISTENERS = [{"name": "s", "kind": "socks5", "listen": "127.0.0.1:1080"}]


def write_config(d: Path, routes: list[dict[str, object]], **top: object) -> Path:
    path = d / "gate.yaml"
    path.write_text(yaml.safe_dump({"listeners": LISTENERS, "routes": routes, **top}))
    return path


def test_lists_are_read_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "country.txt").write_text(
        "# blocks, as published\n\n10.1.0.0/16\n  192.0.2.7   # one address\r\n2001:db8::/32\n")
    (tmp_path / "lists" / "ads.txt").write_text("ads.example\n*.tracker.test\n.Track.Test.\n# end\n")
    path = write_config(tmp_path, [
        {"name": "ads", "match": {"host": "inline.test", "host_from": "lists/ads.txt"}, "action": "reject"},
        {"name": "country", "match": {"dst": "10.9.0.0/16", "dst_from": ["lists/country.txt"]}, "action": "direct"},
        {"name": "rest", "action": "reject"}])
    config = load_config(path)
    ads, country = config.routes[0].match, config.routes[1].match
    assert ads.host == ("inline.test", "ads.example", "*.tracker.test", ".track.test")
    assert ads.host_from == ("lists/ads.txt",)
    assert country.dst == tuple(map(ipaddress.ip_network, ("10.9.0.0/16", "10.1.0.0/16", "192.0.2.7/32",
                                                           "2001:db8::/32")))
    router = Router(config.routes)
    assert router.explain(FlowKey("s", "127.0.0.1", "a.track.test", 443, "A.track.test"))[0] == (
        "routes[0] ads: MATCH: reject (host 'a.track.test' matches '.track.test')")
    for dst, host, rule in (("a.track.test", "a.track.test", "ads"), ("track.test", "track.test", "ads"),
                            ("inline.test", "inline.test", "ads"), ("192.0.2.7", None, "country"),
                            ("2001:db8::1", None, "country"), ("192.0.2.8", None, "rest")):
        assert router.decide(FlowKey("s", "127.0.0.1", dst, 443, host)).rule == rule


def test_bad_lines_are_located_by_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("10.0.0.0/8\n# fine\n10.0.0.300\n\nnot-an-address\n")
    (tmp_path / "h.txt").write_text("ok.test\n**.bad\n")
    path = write_config(tmp_path, [{"match": {"dst_from": "c.txt", "host_from": ["h.txt", "missing.txt"]},
                                    "action": "direct"}])
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == [
        "routes[0].match.dst_from: c.txt:3: '10.0.0.300' is not an IP address or CIDR",
        "routes[0].match.dst_from: c.txt:5: 'not-an-address' is not an IP address or CIDR",
        "routes[0].match.host_from: h.txt:2: '**.bad' is not a host name, *.suffix or .suffix",
        "routes[0].match.host_from: missing.txt: No such file or directory",
    ]


def test_an_empty_list_is_refused_not_read_as_any(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, [{"match": {"host_from": "empty.txt"}, "action": "reject"}]))
    assert e.value.problems == ["routes[0].match.host_from: empty.txt: no entries (the route would match every name)"]
    # beside inline entries it only adds nothing
    config = load_config(write_config(tmp_path, [{"match": {"dst": "10.0.0.0/8", "dst_from": "empty.txt"},
                                                  "action": "reject"}]))
    assert config.routes[0].match.dst == (ipaddress.ip_network("10.0.0.0/8"),)


def test_a_wrong_file_reports_a_few_lines_and_a_count(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("".join(f"bad{i}\n" for i in range(25)))
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, [{"match": {"dst_from": "c.txt"}, "action": "direct"}]))
    assert len(e.value.problems) == route_lists.MAX_PROBLEMS + 1
    assert e.value.problems[-1] == "routes[0].match.dst_from: c.txt: 15 more bad lines"


def test_not_utf8_is_located(tmp_path: Path) -> None:
    (tmp_path / "h.txt").write_bytes(b"a.test\nb.test\n\xff\xfe.test\n")
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, [{"match": {"host_from": "h.txt"}, "action": "direct"}]))
    assert e.value.problems == ["routes[0].match.host_from: h.txt:3: not UTF-8"]


def test_size_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "h.txt").write_text("# six names\n" + "".join(f"n{i}.test\n" for i in range(6)))
    path = write_config(tmp_path, [{"match": {"host_from": "h.txt"}, "action": "direct"}])
    monkeypatch.setattr(route_lists, "MAX_LIST_ENTRIES", 6)
    assert len(load_config(path).routes[0].match.host) == 6  # at the bound: read
    monkeypatch.setattr(route_lists, "MAX_LIST_ENTRIES", 5)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == ["routes[0].match.host_from: h.txt:7: more than 5 entries (MAX_LIST_ENTRIES)"]
    monkeypatch.setattr(route_lists, "MAX_LIST_BYTES", 20)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == ["routes[0].match.host_from: h.txt: over 0 MiB (MAX_LIST_BYTES); is this a list of "
                                "one entry per line?"]


LINES = st.sampled_from(["10.0.0.0/8", "fd00::/8", "a.test", "*.b.test", ".c.test", "# c", "", "  ", "x y",
                          "10.0.0.0/8 # c", "\xff", "*", "..d", "1.2.3.4/33", "\r"])


@budget(200)
@given(st.one_of(st.lists(LINES, max_size=20).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogateescape")),
                 st.binary(max_size=200)))
def test_any_file_gives_entries_or_located_problems(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("lists") / "l.txt"
    path.write_bytes(data)
    for entry in (network, host_pattern):
        try:
            found = route_lists.read_list(path, entry, "l.txt")
        except route_lists.ListProblems as e:
            assert e.problems and all(p.startswith("l.txt:") for p in e.problems)
            continue
        assert isinstance(found, tuple) and len(found) <= data.count(b"\n") + 1


def test_without_a_config_file_lists_are_relative_to_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c.txt").write_text("10.0.0.0/8\n")
    monkeypatch.chdir(tmp_path)
    config = parse_config({"listeners": LISTENERS, "routes": [{"match": {"dst_from": "c.txt"}, "action": "direct"}]})
    assert config.routes[0].match.dst == (ipaddress.ip_network("10.0.0.0/8"),)


def big_list(d: Path, count: int) -> Path:
    path = d / "country.txt"
    # every other /24, so the list does not collapse into a few blocks
    path.write_text("".join(f"100.{64 + i // 128}.{i % 128 * 2}.0/24\n" for i in range(count)) + "192.0.2.0/24\n")
    return path


def test_explain_quotes_the_start_of_a_long_list_and_its_file(tmp_path: Path) -> None:
    big_list(tmp_path, 2000)
    config = load_config(write_config(tmp_path, [{"name": "country", "match": {"dst_from": "country.txt"},
                                                  "action": "direct"}, {"name": "rest", "action": "reject"}]))
    router = Router(config.routes)
    lines = router.explain(FlowKey("s", "127.0.0.1", "198.51.100.1", 80, None))
    assert lines[0] == ("routes[0] country: no: dst 198.51.100.1 not in ['100.64.0.0/24', '100.64.2.0/24', "
                        "'100.64.4.0/24', '100.64.6.0/24', '100.64.8.0/24', '100.64.10.0/24', '100.64.12.0/24', "
                        "'100.64.14.0/24', '...'] (2,001 in all, with country.txt)")
    assert router.explain(FlowKey("s", "127.0.0.1", "192.0.2.9", 80, None)) == [
        "routes[0] country: MATCH: direct (dst 192.0.2.9 in 192.0.2.0/24)"]  # which entry, among 2,001


def test_ugate_check_and_route_with_list_files(tmp_path: Path) -> None:
    big_list(tmp_path, 100)
    (tmp_path / "bad.txt").write_text("ok.test\n0.0.0.0 ads.test\n")  # hosts-file form: not one name
    good = write_config(tmp_path, [{"name": "country", "match": {"dst_from": "country.txt"}, "action": "reject"}])

    def ugate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gate", *args], cwd=ROOT, capture_output=True, text=True)

    done = ugate("route", "--config", str(good), "--listener", "s", "--dst", "100.64.4.9", "--port", "80")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["routes[0] country: MATCH: reject (dst 100.64.4.9 in 100.64.4.0/24)"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"listeners": LISTENERS, "routes": [{"match": {"host_from": "bad.txt"},
                                                                      "action": "reject"}]}))
    done = ugate("check", "--config", str(bad))
    assert done.returncode == 2, done.stdout
    assert "routes[0].match.host_from: bad.txt:2: '0.0.0.0 ads.test' is not a host name" in done.stderr


CAPTURED = [{"name": "tp", "kind": "tproxy", "listen": "0.0.0.0:15001"},
            {"name": "tp6", "kind": "tproxy", "listen": "[::]:15006"}]
FAST = {"action": "direct", "preserve_source": True}


def test_a_long_bypass_list_becomes_a_named_interval_set(tmp_path: Path) -> None:
    path = big_list(tmp_path, 300)
    with path.open("a") as f:  # overlapping and adjacent entries: collapsed in the set
        f.write("100.64.0.0/23\n100.64.0.7/32\n" + "".join(f"2001:db8:{i:x}::/48\n" for i in range(SET_ABOVE + 1)))
    config = parse_config({"listeners": CAPTURED, "capture": {"mode": "tproxy", "role": "router"}, "routes": [
        {"name": "country", "match": {"dst_from": str(path), "port": [80, 443]}, **FAST},
        {"name": "lan", "match": {"dst": "10.0.0.0/8"}, **FAST}, {"action": "direct"}]})
    assert [b.name for b in bypass_of(config)] == ["country", "lan"]
    found = rules_of(config)
    assert found is not None
    nft = found[1].nft
    assert ('meta nfproto ipv4 meta l4proto { tcp, udp } ip daddr @bypass0_dst4 th dport { 80, 443 } return '
            'comment "bypass: route country"') in nft
    assert "ip6 daddr @bypass0_dst6 th dport { 80, 443 } return" in nft
    assert 'ip daddr 10.0.0.0/8 return comment "bypass: route lan"' in nft  # short: inline as before
    declared = nft.split("set bypass0_dst4 {")[1].split("}")[0]
    assert "type ipv4_addr; flags interval;" in declared
    elements = [e.strip() for e in declared.split("elements = {")[1].split(",")]
    # merged: 100.64.0.0/23 took in the /32 and touches 100.64.2.0/24; the rest stay every other /24
    assert elements[:3] == ["100.64.0.0-100.64.2.255", "100.64.4.0/24", "100.64.6.0/24"]
    spans = []
    for element in elements:
        first, _, last = element.partition("-")
        net = ipaddress.ip_network(first)
        spans.append((int(net.network_address), int(ipaddress.ip_address(last)) if last else int(net[-1])))
    assert all(hi + 1 < lo for (_, hi), (lo, _) in itertools.pairwise(spans))  # sorted, apart: as nft wants them
    listed = [n for n in config.routes[0].match.dst if n.version == 4]
    assert all(any(lo <= int(n.network_address) and int(n[-1]) <= hi for lo, hi in spans) for n in listed)
    assert nft.count("  set bypass") == 2  # country's two families; lan's one network stays inline


def test_bypass_with_long_lists_on_both_sides(tmp_path: Path) -> None:
    """An earlier user-space route with a long list blocks a later one only where their lists meet."""
    left = [f"100.{64 + i // 256}.{i % 256}.0/24" for i in range(3000)]
    right = [f"100.{96 + i // 256}.{i % 256}.0/24" for i in range(3000)]
    routes = [{"name": "ads", "match": {"dst": left, "host": "*.ads.test"}, "action": "reject"},
              {"name": "country", "match": {"dst": right}, **FAST}]
    config = parse_config({"listeners": CAPTURED, "routes": routes})
    assert [r.name for r in bypass_routes(config.routes)] == ["country"]
    routes[1]["match"] = {"dst": [*right, "100.70.3.128/25"]}  # one entry inside "ads"'s list
    config = parse_config({"listeners": CAPTURED, "routes": routes})
    assert bypass_routes(config.routes) == ()
