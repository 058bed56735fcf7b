"""Enrichment (ignore, labels, direction) and local address discovery."""

from __future__ import annotations

import ipaddress

import pytest
from sample_flows import flow
from test_config import error_of

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


# -- range labels (enrich.ranges) --------------------------------------------

RANGES = """\
enrich:
  local_addresses: [192.0.2.2, '2001:db8::2']
  labels: {site: fra1}
  ranges:
    - {range: 198.51.100.0/24, labels: {customer: wide, env: prod}}
    - {range: 198.51.100.10-198.51.100.20, labels: {customer: acme}}
    - {range: '2001:db8:1::-2001:db8:1::ff', labels: {customer: six}}
    - {range: 203.0.113.7, labels: {site: override}}
"""


@pytest.mark.parametrize(("orig", "expected"), [
    ((HOST, "198.51.100.15", 40000, 443), {"customer": "acme", "env": "prod"}),        # narrower wins
    ((HOST, "198.51.100.21", 40000, 443), {"customer": "wide", "env": "prod"}),
    (("198.51.100.10", HOST, 40000, 22), {"customer": "acme", "env": "prod"}),         # inbound: the source
    ((HOST, "198.51.101.1", 40000, 443), {}),
    (("2001:db8::2", "2001:db8:1::80", 40000, 443), {"customer": "six"}),
    (("2001:db8::2", "2001:db8:1::100", 40000, 443), {}),
    ((HOST, "203.0.113.7", 40000, 443), {"site": "override"}),                          # over the global label
])
def test_range_labels_of_the_remote_endpoint(orig, expected):
    event = enricher(RANGES)(flow(orig=orig))
    want = {"site": "fra1", **expected}
    want["direction"] = event.labels["direction"]
    assert event.labels == want


def test_range_endpoint_source_destination_either():
    base = RANGES.replace("  ranges:", "  range_endpoint: %s\n  ranges:")
    orig = ("198.51.100.10", "203.0.113.7", 1, 2)    # forward: neither local
    got = {mode: {k: v for k, v in enricher(base % mode)(flow(orig=orig)).labels.items() if k != "direction"}
           for mode in ("remote", "source", "destination", "either")}
    assert got["remote"] == got["destination"] == {"site": "override"}
    assert got["source"] == {"site": "fra1", "customer": "acme", "env": "prod"}
    assert got["either"] == {"site": "override", "customer": "acme", "env": "prod"}


def test_range_destination_is_where_the_flow_ends():
    """A DNATed flow ends on the reply tuple's source, as its direction says."""
    enrich = enricher(RANGES.replace("  ranges:", "  range_endpoint: destination\n  ranges:"))
    event = enrich(flow(orig=("203.0.113.9", HOST, 1, 8080), reply=("198.51.100.12", "203.0.113.9", 80, 1)))
    assert event.labels["customer"] == "acme"


def _naive_labels(ranges, address):
    """The reference: every covering range, wider first, later wins on ties."""
    ip = ipaddress.ip_address(address)
    covering = [(-(int(r.range[1]) - int(r.range[0])), i, r.labels) for i, r in enumerate(ranges)
                if r.range[0].version == ip.version and r.range[0] <= ip <= r.range[1]]
    merged = {}
    for *_, labels in sorted(covering, key=lambda c: (c[0], c[1])):
        merged.update(labels)
    return merged


def test_range_table_agrees_with_a_linear_scan_on_overlapping_ranges():
    import random

    from conntracct.enrich import NO_RANGE, RangeTable
    from conntracct.enrichconfig import RangeLabels
    rng = random.Random(7)
    ranges = []
    for i in range(300):
        lo = rng.randrange(0, 4000)
        hi = lo + rng.choice([0, 1, 5, 50, 700])
        base = int(ipaddress.ip_address("10.0.0.0")) if i % 3 else int(ipaddress.ip_address("2001:db8::"))
        first, last = ipaddress.ip_address(base + lo), ipaddress.ip_address(base + hi)
        ranges.append(RangeLabels(range=f"{first}-{last}", labels={f"k{i % 7}": str(i)}))
    table = RangeTable(ranges)
    for base in ("10.0.0.0", "2001:db8::"):
        for offset in range(0, 4800, 3):
            ip = ipaddress.ip_address(int(ipaddress.ip_address(base)) + offset)
            seg = table.find(ip)
            assert (table.labels[seg] if seg != NO_RANGE else {}) == _naive_labels(ranges, str(ip)), ip


@pytest.mark.parametrize(("text", "error"), [
    ("{range: 192.0.2.20-192.0.2.10, labels: {a: b}}", "ranges[0].range: expected START-END with START not above END"),
    ("{range: 192.0.2.1-2001:db8::1, labels: {a: b}}", "ranges[0].range: expected both ends in one address family"),
    ("{range: 192.0.2.0/33, labels: {a: b}}", "ranges[0].range: expected an address range"),
    ("{range: 192.0.2.0/24, labels: {direction: in}}", "ranges[0].labels.direction: label 'direction' is set"),
    ("{range: 192.0.2.0/24}", "ranges[0].labels: "),
])
def test_bad_ranges_are_named(text, error):
    assert f"test.yml:3: enrich.{error}" in error_of("enrich:\n  ranges:\n    - %s\n" % text)


# -- ignore rules with protocols and ports -----------------------------------

RULES = """\
enrich:
  local_addresses: [192.0.2.2]
  ignore:
    - 10.0.0.0/8
    - udp/53 to 198.51.100.0/24
    - tcp 1-1023 from 2001:db8::/32
    - {protocol: both, ports: [5353, 8000-8100], net: 203.0.113.0/24}
    - {protocol: tcp, source_ports: 179}
    - icmp
"""


@pytest.mark.parametrize(("fields", "ignored"), [
    (dict(orig=("10.1.1.1", "198.51.100.2", 1, 2)), True),                     # plain CIDR kept
    (dict(orig=(HOST, "198.51.100.2", 40000, 53), proto=17), True),
    (dict(orig=(HOST, "198.51.100.2", 40000, 53), proto=6), False),            # udp only
    (dict(orig=(HOST, "198.51.101.2", 40000, 53), proto=17), False),           # not to that network
    (dict(orig=("198.51.100.2", HOST, 53, 40000), proto=17), False),           # `to`: not from it
    (dict(orig=("2001:db8::9", "2001:db9::1", 40000, 443)), True),
    (dict(orig=("2001:db8::9", "2001:db9::1", 40000, 1024)), False),           # above the range
    (dict(orig=("2001:db9::9", "2001:db8::1", 40000, 443)), False),            # `from`: not to it
    (dict(orig=(HOST, "203.0.113.5", 40000, 8050), proto=17), True),
    (dict(orig=("203.0.113.5", HOST, 40000, 5353)), True),                     # net: either side
    (dict(orig=(HOST, "203.0.113.5", 40000, 8101)), False),
    (dict(orig=(HOST, "203.0.113.5", 40000, 8050), proto=132), False),         # sctp: not tcp/udp
    (dict(orig=(HOST, "198.51.100.9", 179, 40000)), True),                     # source port
    (dict(orig=(HOST, "198.51.100.9", 0, 0), proto=1), True),                  # icmp: protocol alone
    (dict(orig=(HOST, "198.51.100.9", 0, 0), proto=58), False),
])
def test_ignore_rules_with_protocols_and_ports(fields, ignored):
    assert (enricher(RULES)(flow(**fields)) is None) == ignored


def test_ignore_rules_memoised_per_flow_count_every_record():
    stats = Stats()
    enrich = enricher(RULES, stats.stage("enrich"))
    memo = {}
    for _ in range(3):
        assert enrich(flow(orig=(HOST, "198.51.100.2", 40000, 53), proto=17, memo=memo)) is None
    assert len(memo) == 1 and stats.snapshot()["stages"]["enrich"] == {"ignored": 3}


@pytest.mark.parametrize(("rule", "error"), [
    ("'udp/99999 to 198.51.100.0/24'", "ports in this rule: expected ports such as 53"),
    ("'tcp from'", "expected a CIDR such as 10.0.0.0/8 or a rule such as"),
    ("'tcp to 198.51.100.0/33'", "to in this rule: expected a CIDR"),
    ("'tcp 22 from 192.0.2.0/24 from 192.0.2.0/24'", "expected a CIDR such as 10.0.0.0/8 or a rule"),
    ("'smtp/25'", "expected a CIDR such as 10.0.0.0/8 or a rule"),
    ("{protocol: tcpp}", ".protocol: expected a protocol: icmp, tcp, udp"),
    ("{ports: 0-70000}", ".ports: expected ports"),
    ("{protocol: tcp, fro: 192.0.2.0/24}", ".fro: unknown key (did you mean 'from'?)"),
    ("{}", "expected a rule naming a protocol, ports or a network"),
])
def test_bad_ignore_rules_are_named(rule, error):
    message = error_of("enrich:\n  ignore:\n    - 10.0.0.0/8\n    - %s\n" % rule)
    assert message.startswith("test.yml:4: enrich.ignore[1]") and error in message, message
    if rule.startswith("'"):
        assert f"(got {rule})" in message    # the rule as written


def test_ignore_rules_print_as_written_and_as_mappings():
    config = parse_config(RULES).enrich
    assert [str(r) for r in config.ignore] == [
        "10.0.0.0/8", "udp/53 to 198.51.100.0/24", "tcp 1-1023 from 2001:db8::/32",
        "tcp,udp/5353,8000-8100 net 203.0.113.0/24", "tcp sport 179", "icmp"]
    again = parse_config("enrich:\n  ignore:\n" + "".join(
        f"    - {r.describe()!r}\n" for r in config.ignore[1:])).enrich
    assert [r.as_mapping() for r in again.ignore] == [r.as_mapping() for r in config.ignore[1:]]


def test_range_labels_reach_every_sinks_output():
    """The same enriched records: InfluxDB tags (both schemas), JSON labels,
    text labels, and the Prometheus per-host series (with `other` empty)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from conntracct.sinks.goschema import ConntracctLineFormatter
    from conntracct.sinks.lineprotocol import LineFormatter
    from conntracct.sinks.prometheus import FlowCollector, FlowTable
    from conntracct.sinks.records import json_line
    from conntracct.sinks.stdout import text_line

    enrich = enricher(RANGES)
    acme = enrich(flow(orig=(HOST, "198.51.100.15", 40000, 443), flow_id=1))
    plain = enrich(flow(orig=(HOST, "192.0.2.77", 40000, 443), flow_id=2))
    assert "customer=acme" in LineFormatter().point(acme)[0].split(",")
    assert ",customer=acme," in ConntracctLineFormatter().point(acme)[0] + ","
    assert '"customer":"acme"' in json_line(acme) and "customer=acme" in text_line(acme)

    table = FlowTable(max_hosts=1)
    table.apply([acme, plain])     # one place: the second host counts under `other`
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FlowCollector(table, "prometheus"))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in
               text_string_to_metric_families(generate_latest(registry).decode()) for s in family.samples}
    labelled = (("customer", "acme"), ("env", "prod"), ("host", "198.51.100.15:443"), ("site", "fra1"))
    assert samples[("conntrack_open_connections", labelled)] == 1
    assert samples[("conntrack_open_connections",
                    (("customer", ""), ("env", ""), ("host", "other"), ("site", "")))] == 1
    assert samples[("conntrack_flow_bytes_total", tuple(sorted((*labelled, ("direction", "orig")))))] == 180
    assert not any("direction" in dict(key) and name.endswith("_connections") for name, key in samples)


def test_promacct_range_text_is_accepted_as_it_is():
    config = parse_config("enrich:\n  ranges:\n    - 192.0.2.10-192.0.2.20:customer=acme:env=prod\n"
                          "    - '2001:db8::/32:customer=six'\n").enrich
    assert [(r.range_text, r.labels) for r in config.ranges] == [
        ("192.0.2.10-192.0.2.20", {"customer": "acme", "env": "prod"}), ("2001:db8::/32", {"customer": "six"})]
    assert "test.yml:3: enrich.ranges[0]: expected {range: ..., labels: {...}} or promacct's -r text" in error_of(
        "enrich:\n  ranges:\n    - 192.0.2.10-192.0.2.20\n")
