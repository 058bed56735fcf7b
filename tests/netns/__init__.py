"""Network-namespace harness for conntracct integration tests (root only).

    from tests.netns import Topology

    with Topology(acct=True, timestamp=True) as topo:
        with topo.conntrack_events() as cap:
            t = topo.tcp_transfer(10_000, reply_bytes=2_000)
            topo.flush()
        [ev] = find_flows(cap.events, proto="tcp", orig_sport=t.sport)

See topology.py (namespaces, conntrack access), traffic.py (TCP/UDP/ICMP
flows), churn.py (many short flows per second) and conntrack.py (parsing).
"""

from .churn import ChurnResult, build_churn
from .conntrack import EventCapture, Flow, find_flows, match_flow, parse_flow_line, parse_flows, parse_stats
from .topology import DEFAULT_TIMEOUTS, PREFIX, CommandError, Topology, cleanup_stale, list_namespaces
from .traffic import Ping, TcpTransfer, UdpExchange, ping, tcp_transfer, udp_exchange

__all__ = [
    "ChurnResult", "CommandError", "DEFAULT_TIMEOUTS", "EventCapture", "Flow", "PREFIX",
    "Ping", "TcpTransfer", "Topology", "UdpExchange", "build_churn", "cleanup_stale",
    "find_flows", "list_namespaces", "match_flow", "parse_flow_line", "parse_flows",
    "parse_stats", "ping", "tcp_transfer", "udp_exchange",
]
