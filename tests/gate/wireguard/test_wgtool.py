"""``wg show IF dump`` parsed (output captured from wireguard-tools 1.0.20210914 with wireguard-go)."""

from __future__ import annotations

import pytest

from gate.wireguard.wgtool import Dump, WgPeer, WgToolError, parse_dump, public_key_ok

DUMP = (
    "KFSV9JsLSi9Pl6Yv6wg99dvHPQC5c/JCJrvSmL4UGGA=\tCMK+72kAW4ECY6mUX7gZfBq3/a//nBraEGnqyP09DlY=\t51820\toff\n"
    "V+BQn3EHehsVaDqmlKY6WmHXj/YJsYC20wNiYi/j5RI=\t(none)\t10.90.0.1:51900\t10.99.0.1/32\t1764429000\t644\t588\t25\n"
    "Csh83LtrXi+BJ9BZzaUGxu49BwbK9gwgxoiqyZoGyws=\t(none)\t(none)\t(none)\t0\t0\t0\toff\n"
)


def test_interface_and_peers() -> None:
    assert parse_dump(DUMP) == Dump(
        public_key="CMK+72kAW4ECY6mUX7gZfBq3/a//nBraEGnqyP09DlY=", listen_port=51820, peers=(
            WgPeer("V+BQn3EHehsVaDqmlKY6WmHXj/YJsYC20wNiYi/j5RI=", "10.90.0.1:51900", ("10.99.0.1/32",),
                   1764429000, 644, 588),
            WgPeer("Csh83LtrXi+BJ9BZzaUGxu49BwbK9gwgxoiqyZoGyws=", None, (), 0, 0, 0)))


@pytest.mark.parametrize("text", ["", "a\tb\n", DUMP.replace("51820", "port"), DUMP + "x\ty\n",
                                  DUMP.replace("\t644\t", "\tmany\t")])
def test_what_is_not_a_dump(text: str) -> None:
    with pytest.raises(WgToolError):
        parse_dump(text)


def test_public_keys() -> None:
    assert public_key_ok("CMK+72kAW4ECY6mUX7gZfBq3/a//nBraEGnqyP09DlY=")
    assert not public_key_ok("CMK+72kAW4ECY6mUX7gZfBq3/a//nBraEGnqyP09DlY")  # unpadded
    assert not public_key_ok("not a key at all, but forty-four characters")
    assert not public_key_ok("")
