"""stdout/stderr sink: text and JSON lines, and the documented record fields."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from sample_flows import T0, flow

from conntracct.config import parse_config
from conntracct.flow import DESTROY, FLAG_BACKDATED, FLAG_NO_ACCT, NEW, UPDATE
from conntracct.sinks import create_sink
from conntracct.sinks.base import PermanentSinkError
from conntracct.sinks.records import json_line, rfc3339
from conntracct.sinks.stdout import text_line
from tests.reference.records import flow_record

DOCS = Path(__file__).resolve().parents[2] / "docs" / "record-fields.md"

NAT_V4 = flow(UPDATE, reply=("198.51.100.2", "198.51.100.1", 80, 40000), labels={"direction": "outbound"})
UDP_V6 = flow(NEW, orig=("2001:db8:1::2", "2001:db8:2::2", 5353, 53), proto=17, zone=3, mark=0x10)
ICMP_END = flow(DESTROY, orig=("192.0.2.2", "192.0.2.1", 0, 0), proto=1, icmp=(8, 0, 4660), stop_ns=T0,
                tcp_state=0, flags=FLAG_BACKDATED | FLAG_NO_ACCT)


def sink(yaml_text: str):
    return create_sink(parse_config(yaml_text).sinks[0])


def test_text_line_ipv4_with_nat():
    assert text_line(NAT_V4) == (
        "2026-11-18T11:06:40.123Z UPDATE  tcp 192.0.2.2:40000 -> 198.51.100.2:80"
        " [nat reply 198.51.100.2:80 -> 198.51.100.1:40000] state=established"
        " pkts=3/2 (+1/+1) bytes=180/120 (+60/+40) netns=4026531840 id=1234abcd5678ef90"
        " labels={direction=outbound}\n")


def test_text_line_ipv6_brackets_addresses_with_ports():
    assert text_line(UDP_V6) == (
        "2026-11-18T11:06:40.123Z NEW     udp [2001:db8:1::2]:5353 -> [2001:db8:2::2]:53"
        " pkts=3/2 (+1/+1) bytes=180/120 (+60/+40) zone=3 mark=0x10 netns=4026531840 id=1234abcd5678ef90\n")


def test_text_line_icmp_destroy_shows_type_code_ident_duration_and_flags():
    # no_acct: counters are absent, so none are printed
    assert text_line(ICMP_END) == (
        "2026-11-18T11:06:40.123Z DESTROY icmp 192.0.2.2 -> 192.0.2.1 type=8 code=0 ident=4660"
        " dur=2.000s netns=4026531840 flags=backdated,no_acct id=1234abcd5678ef90\n")


def test_json_line_ipv4_with_nat():
    line = json_line(NAT_V4)
    assert line.endswith("}\n") and "\n" not in line[:-1]
    assert json.loads(line) == {
        "kind": "update", "flow_id": "1234abcd5678ef90", "family": 4, "protocol": "tcp",
        "protocol_number": 6,
        "orig": {"src": "192.0.2.2", "dst": "198.51.100.2", "sport": 40000, "dport": 80},
        "reply": {"src": "198.51.100.2", "dst": "198.51.100.1", "sport": 80, "dport": 40000},
        "nat": True,
        "packets_orig": 3, "bytes_orig": 180, "packets_reply": 2, "bytes_reply": 120,
        "delta_packets_orig": 1, "delta_bytes_orig": 60, "delta_packets_reply": 1, "delta_bytes_reply": 40,
        "start": "2026-11-18T11:06:38.123456789Z", "start_ns": T0 - 2_000_000_000,
        "stop": None, "stop_ns": 0,
        "timestamp": "2026-11-18T11:06:40.123456789Z", "timestamp_ns": T0,
        "zone": 0, "mark": 0, "netns": 4026531840, "status": 0x18E, "tcp_state": "established",
        "flags": [], "end_reason": "active_timeout", "labels": {"direction": "outbound"}}


def test_json_line_icmp_and_ipv6():
    icmp = json.loads(json_line(ICMP_END))
    assert icmp["icmp"] == {"type": 8, "code": 0, "id": 4660}
    assert (icmp["protocol"], icmp["tcp_state"], icmp["nat"]) == ("icmp", None, False)
    assert icmp["flags"] == ["backdated", "no_acct"]
    assert icmp["stop"] == "2026-11-18T11:06:40.123456789Z"
    v6 = json.loads(json_line(UDP_V6))
    assert (v6["family"], v6["orig"]["src"], v6["protocol_number"]) == (6, "2001:db8:1::2", 17)
    assert "icmp" not in v6


def test_rfc3339_precisions():
    assert rfc3339(T0) == "2026-11-18T11:06:40.123456789Z"
    assert rfc3339(T0, 6) == "2026-11-18T11:06:40.123456Z"
    assert rfc3339(1_000_000_007) == "1970-01-01T00:00:01.000000007Z"


def test_docs_table_lists_exactly_the_json_fields():
    documented = re.findall(r"^\| `([a-z_.]+)` \|", DOCS.read_text(), flags=re.MULTILINE)
    top = [name for name in documented if "." not in name]
    record = flow_record(ICMP_END)
    assert top == list(record)    # same names, same order
    nested = {name for name in documented if "." in name}
    assert nested == {f"{k}.{sub}" for k in ("orig", "reply", "icmp") for sub in record[k]}


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_sink_writes_one_line_per_record_to_its_stream(stream, capsys):
    s = sink(f"sinks: [{{type: {stream}, format: json}}]")
    s.write([NAT_V4, UDP_V6])
    s.close()
    out, err = capsys.readouterr()
    lines = (out if stream == "stdout" else err).splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["update", "new"]
    assert (err if stream == "stdout" else out) == ""


def test_sink_reports_a_closed_stream_as_permanent(monkeypatch):
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr("sys.stdout", closed)
    with pytest.raises(PermanentSinkError):
        sink("sinks: [{type: stdout}]").write([NAT_V4])


def test_json_line_is_the_documented_record_encoded():
    """json_line() writes the JSON by hand: it must be exactly the encoder's
    text of flow_record() (tests/reference/records.py), whatever the event holds."""
    import json
    import random

    encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    rng = random.Random(3)
    texts = ["outbound", 'quo"te', "back\\slash", "tab\there", "nl\n", "ünïcødé", "\x01", "", "\x7f\x1f\b\f\r",
             "\u2028 𝄞", "lone \ud800 surrogate"]
    counters = [0, 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
    for _ in range(2000):
        labels = {rng.choice(texts): rng.choice(texts) for _ in range(rng.randrange(4))}
        if rng.random() < 0.05:
            labels[rng.choice(texts)] = rng.choice([7, None, 1.5])   # not text: the encoder's conversions
        kind = rng.choice(["new", "update", "destroy"])
        if rng.random() < 0.1:
            kind = "".join(kind)   # an equal text, not the same object (as read back from a spool)
        e = flow(kind=kind,
                 orig=("192.0.2.2", rng.choice(["198.51.100.2", "2001:db8::1"]), rng.randrange(65536), 80),
                 reply=rng.choice([None, ("198.51.100.2", "198.51.100.1", 80, rng.randrange(65536))]),
                 proto=rng.choice([6, 17, 1, 58, 47, 250]), family=rng.choice([4, 6]),
                 flow_id=rng.randrange(2**63), start_ns=rng.choice([0, T0 - 10**9]),
                 stop_ns=rng.choice([0, T0 + 123]), ts_ns=T0 + rng.randrange(10**12),
                 zone=rng.randrange(3), mark=rng.choice([0, 2**32 - 1]), netns=rng.choice([0, 4026531840]),
                 status=rng.randrange(2**16), tcp_state=rng.randrange(20), flags=rng.randrange(128),
                 icmp=rng.choice([None, (8, 0, rng.randrange(65536))]), labels=labels)
        e.packets_orig, e.bytes_reply, e.delta_bytes_orig = (rng.choice(counters) for _ in range(3))
        assert json_line(e) == encode(flow_record(e)) + "\n"


def test_json_line_of_decoded_records_uses_the_flow_memo_and_stays_the_encoded_record():
    """Decoded records carry FlowEvent.memo (shared per flow identity): the
    identity part of the line is made once per flow, the rest every time."""
    import json
    import random
    import socket

    from conntracct.probe.record import RECORD, decode, pack_tuple

    encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    rng = random.Random(8)
    a, b, c = (socket.inet_pton(socket.AF_INET, x) for x in ("192.0.2.2", "198.51.100.2", "198.51.100.1"))
    tuples = [pack_tuple(socket.AF_INET, proto, src, dst, sport, dport)
              for proto in (6, 1) for src, dst, sport, dport in ((a, b, 40000, 80), (b, c, 80, 40000))]
    memos = set()
    for i in range(300):
        orig, reply = rng.choice(tuples[:2]) if rng.random() < 0.5 else rng.choice(tuples[2:]), rng.choice(tuples)
        raw = RECORD.pack(i, 1_000 * rng.randrange(1, 3), 0, 4, i, i, i, i, 1, 1, 1, 1, 0x18E, orig, reply,
                          4026531840, rng.choice([0, 7]), 0, rng.randrange(1, 4), rng.randrange(10), 0)
        e = decode(raw, 0)
        e.labels = rng.choice([{}, {"direction": "outbound"}])
        memos.add(id(e.memo))
        assert json_line(e) == encode(flow_record(e)) + "\n"
    assert len(memos) > 4
