"""Mode-3 rules as text (no root): the seed's two rules, with STUN's cookie, in ugate's own table."""

from __future__ import annotations

from tproxy.wg_redirect import WgRedirect, build, map_element

EXPECTED = """table inet ugate_wg {
  map out4 { type ipv4_addr . inet_service : inet_service; }
  map out6 { type ipv6_addr . inet_service : inet_service; }
  chain input {
    type filter hook input priority raw; policy accept;
    udp dport 51900 @th,96,32 0x2112a442 counter comment "stun: to the ICE socket"
    udp dport 51900 @th,96,32 != 0x2112a442 counter notrack udp dport set 51820 comment "wireguard: to the interface"
  }
  chain output {
    type filter hook output priority raw; policy accept;
    meta nfproto ipv4 udp sport 51820 udp sport set ip daddr . udp dport map @out4 counter notrack comment "wireguard: from the ICE port"
    meta nfproto ipv6 udp sport 51820 udp sport set ip6 daddr . udp dport map @out6 counter notrack comment "wireguard: from the ICE port"
  }
}
"""  # noqa: E501


def test_one_peer() -> None:
    assert build(WgRedirect(51820, (51900,))) == EXPECTED


def test_several_ice_ports_are_one_set() -> None:
    assert "udp dport { 51900, 51901 } @th,96,32 != 0x2112a442" in build(WgRedirect(51820, (51901, 51900)))


def test_map_elements_by_family() -> None:
    assert map_element("192.0.2.7", 4500, 51900) == ("out4", "192.0.2.7 . 4500 : 51900")
    assert map_element("2001:db8::7", 4500, 51900) == ("out6", "2001:db8::7 . 4500 : 51900")
