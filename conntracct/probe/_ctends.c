/* Conntrack DESTROY events (ctnetlink messages) read straight into the
 * probe's structs (bpf/record.h, included): each flow end as its struct
 * flow_key and its DESTROY struct flow_record.  In Python (parsing,
 * packing both tuples, the key and the record by field name) that was
 * ~10 us of the agent's ~26 us per finished flow on the P6 machine
 * (bench/p6_profile.py).  The Python reader stays for table dumps and
 * lookups; with the record packers it is the reference these functions
 * are held to (tests/reference/ctends.py).
 *
 * parse_ends(buffer, offset, length, netns, wall_offset_ns, now_ns, out)
 *     appends (key, record) for every IPv4/IPv6 IPCTNL_MSG_CT_DELETE
 *     message of the datagram at buffer[offset:offset + length]: the
 *     DESTROY of a flow the probe holds no state for (FLAG_FIRST_SIGHT,
 *     deltas the totals), stamped with its stop time (now_ns without one)
 *     on the probe's clock.  A netlink error message raises OSError.
 * with_state(record, state) -> bytes
 *     that DESTROY for a flow whose struct flow_state was taken: its first
 *     sight and flags, deltas since its last record.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <linux/netlink.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_conntrack.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
#include "../../bpf/record.h"

#define NLA_TYPE(a) ((a)->nla_type & NLA_TYPE_MASK)
#define NLA_DATA(a) ((const u8 *)(a) + NLA_HDRLEN)
#define NLA_PAYLOAD(a) ((unsigned)((a)->nla_len - NLA_HDRLEN))

struct ct_end {
    struct ct_tuple orig, reply;
    u64 start_ns, stop_ns, counters[4];
    u32 status, mark;
    u16 zone;
    u8 tcp_state, counted;      /* counted: bit 0 orig counters seen, bit 1 reply's */
};

/* Each attribute in [start, stop) that fits there whole. */
#define FOR_EACH_ATTR(a, start, stop)                                                         \
    for (const struct nlattr *a = (const struct nlattr *)(start);                              \
         (const u8 *)a + NLA_HDRLEN <= (const u8 *)(stop) && a->nla_len >= NLA_HDRLEN          \
         && (const u8 *)a + a->nla_len <= (const u8 *)(stop);                                  \
         a = (const struct nlattr *)((const u8 *)a + NLA_ALIGN(a->nla_len)))

static u64 be(const struct nlattr *a, unsigned size) {
    if (NLA_PAYLOAD(a) < size)
        return 0;
    u64 v = 0;
    for (unsigned i = 0; i < size; i++)
        v = v << 8 | NLA_DATA(a)[i];
    return v;
}

static void read_tuple(const struct nlattr *nest, struct ct_tuple *t) {
    const u8 *end = (const u8 *)nest + nest->nla_len;
    FOR_EACH_ATTR(a, NLA_DATA(nest), end) {
        const u8 *inner_end = (const u8 *)a + a->nla_len;
        if (NLA_TYPE(a) == CTA_TUPLE_IP) {
            FOR_EACH_ATTR(ip, NLA_DATA(a), inner_end) {
                unsigned kind = NLA_TYPE(ip), width = kind <= CTA_IP_V4_DST ? 4 : 16;
                if (kind < CTA_IP_V4_SRC || kind > CTA_IP_V6_DST || NLA_PAYLOAD(ip) < width)
                    continue;
                /* V4_SRC and V6_SRC are odd, V4_DST and V6_DST even */
                memcpy(kind % 2 ? t->src : t->dst, NLA_DATA(ip), width);
            }
        } else if (NLA_TYPE(a) == CTA_TUPLE_PROTO) {
            FOR_EACH_ATTR(p, NLA_DATA(a), inner_end) {
                unsigned kind = NLA_TYPE(p);
                if (kind == CTA_PROTO_NUM && NLA_PAYLOAD(p) >= 1)
                    t->proto = NLA_DATA(p)[0];
                else if ((kind == CTA_PROTO_SRC_PORT || kind == CTA_PROTO_ICMP_ID || kind == CTA_PROTO_ICMPV6_ID)
                         && NLA_PAYLOAD(p) >= 2)
                    memcpy(&t->src_u, NLA_DATA(p), 2);      /* network order, as the kernel holds it */
                else if (kind == CTA_PROTO_DST_PORT && NLA_PAYLOAD(p) >= 2)
                    memcpy(&t->dst_u, NLA_DATA(p), 2);
                else if ((kind == CTA_PROTO_ICMP_TYPE || kind == CTA_PROTO_ICMPV6_TYPE) && NLA_PAYLOAD(p) >= 1)
                    ((u8 *)&t->dst_u)[0] = NLA_DATA(p)[0];
                else if ((kind == CTA_PROTO_ICMP_CODE || kind == CTA_PROTO_ICMPV6_CODE) && NLA_PAYLOAD(p) >= 1)
                    ((u8 *)&t->dst_u)[1] = NLA_DATA(p)[0];
            }
        }
    }
}

static void read_counters(const struct nlattr *nest, u64 *packets, u64 *bytes) {
    FOR_EACH_ATTR(a, NLA_DATA(nest), (const u8 *)nest + nest->nla_len) {
        if (NLA_TYPE(a) == CTA_COUNTERS_PACKETS)
            *packets = be(a, 8);
        else if (NLA_TYPE(a) == CTA_COUNTERS_BYTES)
            *bytes = be(a, 8);
    }
}

static void read_end(const u8 *body, const u8 *end, u8 family, struct ct_end *e) {
    memset(e, 0, sizeof *e);
    e->orig.family = e->reply.family = family;
    FOR_EACH_ATTR(a, body, end) {
        const u8 *a_end = (const u8 *)a + a->nla_len;
        switch (NLA_TYPE(a)) {
        case CTA_TUPLE_ORIG: read_tuple(a, &e->orig); break;
        case CTA_TUPLE_REPLY: read_tuple(a, &e->reply); break;
        case CTA_STATUS: e->status = (u32)be(a, 4); break;
        case CTA_MARK: e->mark = (u32)be(a, 4); break;
        case CTA_ZONE: e->zone = (u16)be(a, 2); break;
        case CTA_COUNTERS_ORIG: read_counters(a, &e->counters[0], &e->counters[1]); e->counted |= 1; break;
        case CTA_COUNTERS_REPLY: read_counters(a, &e->counters[2], &e->counters[3]); e->counted |= 2; break;
        case CTA_TIMESTAMP:
            FOR_EACH_ATTR(t, NLA_DATA(a), a_end) {
                if (NLA_TYPE(t) == CTA_TIMESTAMP_START)
                    e->start_ns = be(t, 8);
                else if (NLA_TYPE(t) == CTA_TIMESTAMP_STOP)
                    e->stop_ns = be(t, 8);
            }
            break;
        case CTA_PROTOINFO:
            FOR_EACH_ATTR(p, NLA_DATA(a), a_end) {
                if (NLA_TYPE(p) != CTA_PROTOINFO_TCP)
                    continue;
                FOR_EACH_ATTR(s, NLA_DATA(p), (const u8 *)p + p->nla_len) {
                    if (NLA_TYPE(s) == CTA_PROTOINFO_TCP_STATE && NLA_PAYLOAD(s) >= 1)
                        e->tcp_state = NLA_DATA(s)[0];
                }
            }
            break;
        }
    }
}

/* (key, record) of one flow end: the DESTROY of a flow the probe never saw. */
static PyObject *end_pair(const struct ct_end *e, u32 netns, u64 wall_offset, u64 now) {
    struct flow_key key;
    struct flow_record r;
    memset(&key, 0, sizeof key);
    memset(&r, 0, sizeof r);
    key.orig = r.orig = e->orig;
    r.reply = e->reply;
    key.netns = r.netns = netns;
    key.zone = r.zone = e->zone;
    key.start_ns = r.start_ns = e->start_ns;
    r.stop_ns = e->stop_ns;
    u64 stamp = e->stop_ns ? e->stop_ns : now;
    r.ts = stamp > wall_offset ? stamp - wall_offset : 0;   /* a wall clock set back: never below 0 */
    if (e->counted == 3) {
        r.packets[0] = r.delta_packets[0] = e->counters[0];
        r.bytes[0] = r.delta_bytes[0] = e->counters[1];
        r.packets[1] = r.delta_packets[1] = e->counters[2];
        r.bytes[1] = r.delta_bytes[1] = e->counters[3];
    }
    r.status = e->status;
    r.mark = e->mark;
    r.tcp_state = e->tcp_state;
    r.kind = KIND_DESTROY;
    r.flags = FLAG_FIRST_SIGHT | (e->counted == 3 ? 0 : FLAG_NO_ACCT) | (e->start_ns ? 0 : FLAG_NO_TSTAMP);
    return Py_BuildValue("(y#y#)", (const char *)&key, (Py_ssize_t)sizeof key, (const char *)&r, (Py_ssize_t)sizeof r);
}

static PyObject *parse_ends(PyObject *module, PyObject *args) {
    Py_buffer view;
    Py_ssize_t offset, length;
    unsigned long netns;
    unsigned long long wall_offset, now;
    PyObject *out;
    if (!PyArg_ParseTuple(args, "y*nnkKKO!:parse_ends", &view, &offset, &length, &netns, &wall_offset, &now,
                          &PyList_Type, &out))
        return NULL;
    PyObject *result = NULL;
    if (offset < 0 || length < 0 || offset + length > view.len) {
        PyErr_SetString(PyExc_ValueError, "parse_ends: the datagram lies outside the buffer");
        goto done;
    }
    const u8 *pos = (const u8 *)view.buf + offset, *end = pos + length;
    while (pos + NLMSG_HDRLEN <= end) {
        const struct nlmsghdr *h = (const struct nlmsghdr *)pos;
        if (h->nlmsg_len < NLMSG_HDRLEN || pos + h->nlmsg_len > end || h->nlmsg_type == NLMSG_DONE)
            break;
        if (h->nlmsg_type == NLMSG_ERROR && h->nlmsg_len >= NLMSG_HDRLEN + sizeof(int)) {
            int code = -*(const int *)NLMSG_DATA(h);
            if (code) {
                errno = code;
                PyErr_SetFromErrno(PyExc_OSError);
                goto done;
            }
        } else if (h->nlmsg_type == ((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE)
                   && h->nlmsg_len >= NLMSG_HDRLEN + sizeof(struct nfgenmsg)) {
            u8 family = ((const struct nfgenmsg *)NLMSG_DATA(h))->nfgen_family;
            if (family == AF_INET || family == AF_INET6) {
                struct ct_end e;
                read_end(pos + NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(struct nfgenmsg)), pos + h->nlmsg_len, family, &e);
                PyObject *item = end_pair(&e, (u32)netns, wall_offset, now);
                if (!item || PyList_Append(out, item) < 0) {
                    Py_XDECREF(item);
                    goto done;
                }
                Py_DECREF(item);
            }
        }
        pos += NLMSG_ALIGN(h->nlmsg_len);
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&view);
    return result;
}

static PyObject *with_state(PyObject *module, PyObject *args) {
    Py_buffer record, state;
    if (!PyArg_ParseTuple(args, "y*y*:with_state", &record, &state))
        return NULL;
    PyObject *out = NULL;
    if (record.len != sizeof(struct flow_record) || state.len < (Py_ssize_t)sizeof(struct flow_state)) {
        PyErr_Format(PyExc_ValueError, "with_state: a struct flow_record (%zu bytes) and a struct flow_state "
                     "(%zu) are wanted, not %zd and %zd bytes", sizeof(struct flow_record),
                     sizeof(struct flow_state), record.len, state.len);
    } else {
        struct flow_record r;
        struct flow_state st;
        memcpy(&r, record.buf, sizeof r);
        memcpy(&st, state.buf, sizeof st);
        r.first_seen = st.first_seen;
        for (int i = 0; i < 2; i++) {      /* u64 arithmetic: wraps as the probe's own deltas do */
            r.delta_packets[i] = r.packets[i] - st.packets[i];
            r.delta_bytes[i] = r.bytes[i] - st.bytes[i];
        }
        r.flags = (r.flags & ~FLAG_FIRST_SIGHT) | (u8)st.flags;
        out = PyBytes_FromStringAndSize((const char *)&r, sizeof r);
    }
    PyBuffer_Release(&record);
    PyBuffer_Release(&state);
    return out;
}

static PyMethodDef methods[] = {
    {"parse_ends", parse_ends, METH_VARARGS,
     "parse_ends(buffer, offset, length, netns, wall_offset_ns, now_ns, out): append the datagram's "
     "(flow key, DESTROY record) pairs to out."},
    {"with_state", with_state, METH_VARARGS,
     "with_state(record, state) -> bytes: the DESTROY record of a flow whose probe state was taken."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ctends", "Conntrack DESTROY events read into the probe's structs.", -1, methods,
};

PyMODINIT_FUNC PyInit__ctends(void) {
    return PyModule_Create(&module);
}
