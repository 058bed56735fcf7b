"""conntracct top's model and screen without a probe: rates from a flow's
records, the filter, the keys, and a screen that fits 80x24."""

from __future__ import annotations

from rich.console import Console

from conntracct.flow import DESTROY, NEW, UPDATE
from conntracct.top import IDLE_NS, FlowTable, View, handle_key, human, render
from tests.unit.sample_flows import T0, flow

S = 1_000_000_000


def stream(table: FlowTable, fid: int, rate: int, seconds: int, dport: int = 443, src: str = "192.0.2.2",
           direction: str = "outbound") -> None:
    """Records a second of a flow sending `rate` bytes/s (replies a tenth of it)."""
    for k in range(seconds + 1):
        e = flow(NEW if k == 0 else UPDATE, orig=(src, "198.51.100.2", 40000 + fid, dport), flow_id=fid,
                 bytes_orig=100 + rate * k, bytes_reply=50 + rate // 10 * k, packets_orig=1 + 10 * k,
                 packets_reply=1 + 5 * k, ts_ns=T0 + k * S, start_ns=T0)
        e.labels = {"direction": direction}
        table.add(e)


def rows_of(table: FlowTable, view: View, now: int) -> list[str]:
    console = Console(width=80, height=24, record=True, color_system=None)
    console.print(render(table, view, 24, now))
    return console.export_text().splitlines()


def test_rate_is_taken_over_the_last_records_and_drops_to_zero_when_idle():
    table = FlowTable()
    stream(table, 1, 200_000, 5)
    [row] = table.rows(T0 + 5 * S)
    assert row.rates(T0 + 5 * S) == (200_000, 20_000, 10, 5)
    assert row.rates(T0 + 5 * S + IDLE_NS + 1) == (0, 0, 0, 0)


def test_busiest_flow_first_and_sort_keys():
    table = FlowTable()
    stream(table, 1, 50_000, 20, dport=80)     # older, more bytes in all
    stream(table, 2, 300_000, 2, dport=443)
    now = T0 + 20 * S
    view = View()
    lines = [line for line in rows_of(table, view, T0 + 2 * S) if line.startswith("tcp")]
    assert ":443" in lines[0] and "300k" in lines[0]
    handle_key(view, "t")
    assert view.sort == "total"
    lines = [line for line in rows_of(table, view, now) if line.startswith("tcp")]
    assert ":80" in lines[0]


def test_filter_by_port_address_and_network():
    table = FlowTable()
    stream(table, 1, 1000, 2, dport=80, src="192.0.2.2")
    stream(table, 2, 1000, 2, dport=443, src="192.0.2.77")
    view = View()
    for key in "/443\r":
        assert handle_key(view, key)
    assert len([line for line in rows_of(table, view, T0 + 2 * S) if line.startswith("tcp")]) == 1
    handle_key(view, "\x1b")
    for text, count in (("192.0.2.77", 1), ("192.0.2.0/30", 1), ("198.51.100.0/24", 2), ("2001:db8::/32", 0)):
        view.filter = type(view.filter)(text)
        assert len([line for line in rows_of(table, view, T0 + 2 * S) if line.startswith("tcp")]) == count, text


def test_quit_keys_and_ended_flows():
    view = View()
    assert handle_key(view, "q") is False
    table = FlowTable()
    stream(table, 1, 1000, 2)
    end = flow(DESTROY, flow_id=1, ts_ns=T0 + 3 * S, bytes_orig=5000)
    end.labels = {"direction": "outbound"}
    table.add(end)
    assert len(table.rows(T0 + 4 * S)) == 1          # still shown, dimmed
    assert table.rows(T0 + 20 * S) == []             # then forgotten


def test_screen_fits_80x24_with_many_flows():
    table = FlowTable()
    for fid in range(60):
        stream(table, fid, 1000 * (fid + 1), 2, src=f"2001:db8:{fid:x}::1234:5678")
    lines = rows_of(table, View(), T0 + 2 * S)
    assert len(lines) <= 24 and max(map(len, lines)) <= 80
    assert lines[-1].startswith("r rate")


def test_human():
    assert [human(x) for x in (0, 999, 1000, 12_345, 999_499, 1_500_000)] == ["0", "999", "1.0k", "12.3k",
                                                                              "999k", "1.5M"]
