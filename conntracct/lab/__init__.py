"""The namespace lab that `conntracct test` and the tests share.

network.py builds client -- router (conntrack, NAT) -- server in private
network namespaces (address plan, ruleset, sysctls written inside, link
wait, stale-namespace removal); icmp.py makes and recognises echo packets.
`conntracct test` (selftest.py) sends its known traffic from sockets opened
inside the namespaces; tests/netns adds what only the tests need (traffic
endpoints run as processes, conntrack-tools parsing, churn).
"""

from .network import ADDRESSES, ROLES, TABLE, CommandError, Lab, list_namespaces, remove_stale

__all__ = ["ADDRESSES", "ROLES", "TABLE", "CommandError", "Lab", "list_namespaces", "remove_stale"]
