"""CONNECT-UDP request paths (RFC 9298's default URI template): what a peer's request names, and every
other string refused with ClientProtocolError (answered 400), never another exception."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gate.addr import Endpoint
from gate.errors import ClientProtocolError
from gate.mesh.h2_streams import UDP_PATH, udp_path, udp_target
from tests.fuzzing import budget


@pytest.mark.parametrize(("dst", "path"), [
    (Endpoint("192.0.2.6", 443), "/.well-known/masque/udp/192.0.2.6/443/"),  # RFC 9298 section 2's example
    (Endpoint("2001:db8::42", 53), "/.well-known/masque/udp/2001%3Adb8%3A%3A42/53/"),
    (Endpoint("target.example.com", 443), "/.well-known/masque/udp/target.example.com/443/"),
])
def test_paths_round_trip(dst: Endpoint, path: str) -> None:
    assert udp_path(dst) == path
    assert udp_target(path) == dst


@pytest.mark.parametrize("path", [
    "/", "/.well-known/masque/udp/", "/.well-known/masque/udp/host/", "/.well-known/masque/udp/h/0/",
    "/.well-known/masque/udp/h/70000/", "/.well-known/masque/udp/h/53/x", "/.well-known/masque/ip/h/53/",
    "/.well-known/masque/udp/bad host/53/", "/.well-known/masque/udp/" + "a" * 2000 + "/53/",
])
def test_other_paths_are_client_errors(path: str) -> None:
    with pytest.raises(ClientProtocolError):
        udp_target(path)


@budget(300)
@given(st.text(max_size=80))
def test_any_path_is_a_target_or_a_client_error(tail: str) -> None:
    for path in (tail, UDP_PATH + tail):
        try:
            assert isinstance(udp_target(path), Endpoint)
        except ClientProtocolError:
            pass
