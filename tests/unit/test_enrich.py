"""Enrichment (ignore, labels, direction) and local address discovery."""

from __future__ import annotations

import ipaddress

import pytest
from sample_flows import flow

from conntracct.config import parse_config
from conntracct.enrich import Enricher
from conntracct.localaddr import host_networks, ipv4_local, ipv6_local
from conntracct.selfmetrics import Stats

HOST = "192.0.2.2"
FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
           |-- 192.0.2.9
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
"""
IF_INET6 = """\
20010db8000000000000000000000002 02 40 00 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
"""


def enricher(yaml_text: str = "", stats=None) -> Enricher:
    config = parse_config(yaml_text or "enrich: {local_addresses: [192.0.2.2, '2001:db8::2']}").enrich
    return Enricher(config, stats)


@pytest.mark.parametrize(("orig", "reply", "expected"), [
    ((HOST, "198.51.100.2", 40000, 443), None, "outbound"),
    (("198.51.100.2", HOST, 40000, 22), None, "inbound"),
    (("10.0.0.5", "198.51.100.2", 40000, 443), None, "forward"),
    ((HOST, HOST, 40000, 22), None, "local"),
    (("2001:db8::9", "2001:db8::2", 40000, 22), None, "inbound"),
    # DNAT port-forward through this host: really ends on 10.0.0.5 -> forward
    (("198.51.100.2", HOST, 40000, 8080), ("10.0.0.5", "198.51.100.2", 80, 40000), "forward"),
    # redirect to a local proxy: ends here although sent elsewhere -> inbound
    (("10.0.0.5", "198.51.100.7", 40000, 80), (HOST, "10.0.0.5", 3128, 40000), "inbound"),
])
def test_direction(orig, reply, expected):
    event = enricher()(flow(orig=orig, reply=reply))
    assert event.labels["direction"] == expected


def test_ignored_networks_drop_the_flow_and_are_counted():
    stats = Stats()
    enrich = enricher("enrich: {ignore: [127.0.0.0/8, '10.0.0.0/8'], local_addresses: [192.0.2.2]}",
                      stats.stage("enrich"))
    assert enrich(flow(orig=("10.1.1.1", "198.51.100.2", 1, 2))) is None
    assert enrich(flow(orig=("198.51.100.2", "127.0.0.1", 1, 2))) is None
    assert enrich(flow(orig=("198.51.100.2", HOST, 1, 2))) is not None
    assert stats.snapshot()["stages"]["enrich"] == {"ignored": 2}


def test_labels_are_added_to_every_record():
    enrich = enricher("enrich: {labels: {site: fra1, role: nat}, local_addresses: [192.0.2.2]}")
    event = enrich(flow(labels={"probe": "x"}))
    assert event.labels == {"probe": "x", "site": "fra1", "role": "nat", "direction": "outbound"}


def test_cached_verdicts_give_the_same_answers():
    enrich = enricher()
    first = [enrich(flow(orig=o)).labels["direction"] for o in [(HOST, "198.51.100.2", 1, 2)] * 3]
    assert first == ["outbound"] * 3


def test_fib_trie_gives_every_local_ipv4_address():
    assert [str(n) for n in ipv4_local(FIB_TRIE)] == ["127.0.0.0/8", "127.0.0.1/32", "192.0.2.2/32", "192.0.2.9/32"]


def test_if_inet6_gives_every_local_ipv6_address():
    assert [str(n) for n in ipv6_local(IF_INET6)] == ["2001:db8::2/128", "::1/128"]


def test_host_networks_reads_proc_net_and_falls_back_to_loopback(tmp_path):
    (tmp_path / "fib_trie").write_text(FIB_TRIE + FIB_TRIE)    # Main and Local tables repeat
    nets = host_networks(tmp_path)
    assert ipaddress.ip_network("192.0.2.9/32") in nets and len(nets) == len(set(nets)) == 4
    assert [str(n) for n in host_networks(tmp_path / "absent")] == ["127.0.0.0/8", "::1/128"]
