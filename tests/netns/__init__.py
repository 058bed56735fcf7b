"""Network-namespace harness for conntracct integration tests (root only).

    from tests.netns import Topology

    with Topology(acct=True, timestamp=True) as topo:
        with topo.conntrack_events() as cap:
            t = topo.tcp_transfer(10_000, reply_bytes=2_000)
            topo.flush()
        [ev] = find_flows(cap.events, proto="tcp", orig_sport=t.sport)

The namespaces themselves (address plan, ruleset, sysctls, link wait,
removal) are the package's namespace lab, conntracct/lab, shared with
`conntracct test`.  Here: topology.py (the tests' Topology on that lab,
processes and conntrack access), traffic.py (TCP/UDP/ICMP flows), churn.py
(many short flows per second) and conntrack.py (parsing).
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
