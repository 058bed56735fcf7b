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


def test_unlabelled_records_share_label_sets_equal_to_adding_the_labels():
    """A record that arrives without labels gets one of four shared dicts:
    the same keys, values and order as update(labels) then ["direction"]."""
    for labels in ({}, {"site": "fra1", "role": "nat"}):
        enrich = enricher("enrich: {labels: %s, local_addresses: [192.0.2.2]}" % (labels or "{}"))
        seen = {}
        for orig in [(HOST, "198.51.100.2", 1, 2), ("198.51.100.2", HOST, 1, 2), ("10.0.0.5", "198.51.100.2", 1, 2),
                     (HOST, HOST, 1, 2), (HOST, "198.51.100.9", 3, 4)]:
            event = enrich(flow(orig=orig))
            expected = dict(labels)
            expected["direction"] = event.labels["direction"]
            assert list(event.labels.items()) == list(expected.items())
            assert seen.setdefault(event.labels["direction"], event.labels) is event.labels
        assert len(seen) == 4


def test_flow_memo_gives_what_enrichment_without_it_gives():
    """Records carrying FlowEvent.memo (decoded ones) get their labels or
    their ignore verdict worked out once per flow: the same as without, and
    every ignored record still counted."""
    stats_memo, stats_plain = Stats(), Stats()
    config = "enrich: {ignore: ['10.0.0.0/8'], labels: {site: fra1}, local_addresses: [192.0.2.2]}"
    with_memo, plain = enricher(config, stats_memo.stage("enrich")), enricher(config, stats_plain.stage("enrich"))
    flows = [((HOST, "198.51.100.2", 1, 2), None), (("198.51.100.2", HOST, 1, 2), None),
             (("10.1.1.1", "198.51.100.2", 1, 2), None),
             (("198.51.100.2", HOST, 40000, 8080), ("10.0.0.5", "198.51.100.2", 80, 40000)),
             (("10.0.0.5", "198.51.100.7", 40000, 80), (HOST, "10.0.0.5", 3128, 40000))]
    memos = [{} for _ in flows]
    for _ in range(3):
        for (orig, reply), memo in zip(flows, memos, strict=True):
            a, b = with_memo(flow(orig=orig, reply=reply, memo=memo)), plain(flow(orig=orig, reply=reply))
            assert (a is None) == (b is None)
            if a is not None:
                assert list(a.labels.items()) == list(b.labels.items())
    labelled = with_memo(flow(orig=flows[0][0], memo=memos[0], labels={"probe": "x"}))   # labelled: not memoised
    assert labelled.labels == {"probe": "x", "site": "fra1", "direction": "outbound"}
    assert stats_memo.snapshot()["stages"] == stats_plain.snapshot()["stages"] == {"enrich": {"ignored": 6}}
