"""The namespace lab's pieces that need no root (conntracct/lab): the echo
packets, the ruleset, the refusal to write a host-wide sysctl."""

import re

import pytest

from conntracct.lab import ADDRESSES, TABLE, icmp
from conntracct.lab import network as lab


def test_echo_request_v4_carries_a_valid_checksum_and_its_reply_is_recognised():
    request = icmp.echo_request(4, 0x1234, 7, b"x" * 56)
    assert request[:2] == b"\x08\x00" and len(request) == 64
    assert icmp.checksum(request) == 0
    reply = b"\x00\x00" + request[2:]
    ip_header = bytes([0x45]) + bytes(19)          # a raw IPv4 socket returns the IP header too
    assert icmp.is_echo_reply(4, ip_header + reply, 0x1234, 7)
    assert not icmp.is_echo_reply(4, ip_header + reply, 0x1234, 8)
    assert not icmp.is_echo_reply(4, ip_header + request, 0x1234, 7)   # our own request


def test_echo_request_v6_leaves_the_checksum_to_the_kernel():
    request = icmp.echo_request(6, 1, 2, b"")
    assert request == bytes([128, 0, 0, 0, 0, 1, 0, 2])
    assert icmp.is_echo_reply(6, bytes([129, 0, 0xAB, 0xCD, 0, 1, 0, 2]), 1, 2)
    assert not icmp.is_echo_reply(6, b"\x81\x00", 1, 2)


def test_checksum_folds_carries_and_pads_odd_lengths():
    assert icmp.checksum(b"\xff\xff\x00\x01") == 0xFFFE
    assert icmp.checksum(b"\x01") == 0xFEFF


def test_ruleset_tracks_counts_invalid_and_masquerades_out_of_the_server_side():
    rules = lab.ruleset()
    assert f"table inet {TABLE}" in rules and "ct state { new, established, related }" in rules
    assert 'counter name "invalid" drop' in rules and 'oifname "s0" masquerade' in rules
    plain = lab.ruleset(nat=False, drop_invalid=False)
    assert "masquerade" not in plain and 'counter name "invalid" accept' in plain


def test_address_plan_is_documentation_space_and_one_subnet_per_link():
    for place, by_family in ADDRESSES.items():
        assert re.match(r"^(192\.0\.2\.|198\.51\.100\.)", by_family[4]), place
        assert by_family[6].startswith("2001:db8:"), place
    assert {end[2] for end in lab.ENDS} == set(ADDRESSES)


def test_only_network_namespace_sysctls_are_written():
    with pytest.raises(ValueError, match="kernel.pid_max"):
        lab.write_sysctls({"kernel.pid_max": 1})
