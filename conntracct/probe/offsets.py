"""Kernel struct offsets for the C probe, as -D macros, taken from BTF."""

from __future__ import annotations

from .btf import BTF, BTFError

# (macro, struct, member path): byte offsets the probe reads at.
_MEMBERS = [
    ("SKB_NFCT", "sk_buff", "_nfct"),
    ("CT_ZONE_ID", "nf_conn", "zone.id"),
    ("CT_TUPLE_ORIG", "nf_conn", "tuplehash[0].tuple"),
    ("CT_TUPLE_REPLY", "nf_conn", "tuplehash[1].tuple"),
    ("CT_STATUS", "nf_conn", "status"),
    ("CT_NET", "nf_conn", "ct_net.net"),
    ("CT_MARK", "nf_conn", "mark"),
    ("CT_EXT", "nf_conn", "ext"),
    ("CT_TCP_STATE", "nf_conn", "proto.tcp.state"),
    ("TUPLE_SRC_U3", "nf_conntrack_tuple", "src.u3"),
    ("TUPLE_SRC_U", "nf_conntrack_tuple", "src.u"),
    ("TUPLE_L3NUM", "nf_conntrack_tuple", "src.l3num"),
    ("TUPLE_DST_U3", "nf_conntrack_tuple", "dst.u3"),
    ("TUPLE_DST_U", "nf_conntrack_tuple", "dst.u"),
    ("TUPLE_PROTONUM", "nf_conntrack_tuple", "dst.protonum"),
    ("NET_INUM", "net", "ns.inum"),
    ("EXT_OFFSET", "nf_ct_ext", "offset"),
    ("ACCT_COUNTER", "nf_conn_acct", "counter"),
    ("TSTAMP_START", "nf_conn_tstamp", "start"),
]

# (macro, enum, constant)
_ENUMS = [
    ("EXT_ACCT_ID", "nf_ct_ext_id", "NF_CT_EXT_ACCT"),
    ("EXT_TSTAMP_ID", "nf_ct_ext_id", "NF_CT_EXT_TSTAMP"),
    ("EXT_ECACHE_ID", "nf_ct_ext_id", "NF_CT_EXT_ECACHE"),
    ("EXT_NUM", "nf_ct_ext_id", "NF_CT_EXT_NUM"),
    ("IPS_CONFIRMED_BIT", "ip_conntrack_status", "IPS_CONFIRMED_BIT"),
    ("IPS_DYING_BIT", "ip_conntrack_status", "IPS_DYING_BIT"),
]


def kernel_offsets(btf: BTF) -> dict[str, int]:
    """All offsets and constants the probe needs; raises BTFError naming what is missing."""
    out = {macro: btf.offset_of(struct, path) for macro, struct, path in _MEMBERS}
    out.update({macro: btf.enum_value(enum, const) for macro, enum, const in _ENUMS})
    # The probe reads nf_conn once, from its start to the last field it needs.
    out["CT_READ_LEN"] = max(out["CT_TUPLE_REPLY"] + btf.size_of("nf_conntrack_tuple"),
                             out["CT_MARK"] + 4, out["CT_EXT"] + 8, out["CT_TCP_STATE"] + 1,
                             out["CT_STATUS"] + 8, out["CT_NET"] + 8)
    # Counters are {packets, bytes} pairs, original then reply, 8 bytes each.
    counter = btf.size_of("nf_conn_counter")
    if counter != 16 or btf.offset_of("nf_conn_counter", "bytes") != 8:
        raise BTFError("kernel BTF: unexpected struct nf_conn_counter layout")
    if btf.offset_of("nf_conn_tstamp", "stop") != out["TSTAMP_START"] + 8:
        raise BTFError("kernel BTF: unexpected struct nf_conn_tstamp layout")
    return out
