/* Conntrack DESTROY events (ctnetlink messages) read straight into the
 * probe's structs: each flow end as its struct flow_key and its two struct
 * ct_tuple (bpf/record.h, included), plus the values the DESTROY record
 * takes.  In Python (ctnetlink.parse_entry, then record.pack_tuple and
 * flow_key) that was ~5 us of the agent's ~26 us per finished flow
 * (bench/p6_profile.py); the Python reader stays for table dumps and
 * lookups, and is what tests/unit/test_ctnetlink_ends.py holds this to.
 *
 * parse_ends(buffer, offset, length, netns, out) appends, for every
 * IPv4/IPv6 IPCTNL_MSG_CT_DELETE message of the datagram at
 * buffer[offset:offset + length], the tuple
 *     (key, orig, reply, zone, start_ns, stop_ns, counters, status, mark, tcp_state)
 * with counters (orig packets, orig bytes, reply packets, reply bytes), or
 * None unless both directions' counters are there.  A netlink error
 * message raises OSError with its errno.
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

static void read_tuple(const struct nlattr *nest, struct ct_tuple *t, u8 family) {
    t->family = family;
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
        case CTA_TUPLE_ORIG: read_tuple(a, &e->orig, family); break;
        case CTA_TUPLE_REPLY: read_tuple(a, &e->reply, family); break;
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

static PyObject *end_tuple(const struct ct_end *e, u32 netns) {
    struct flow_key key;
    memset(&key, 0, sizeof key);
    key.orig = e->orig;
    key.netns = netns;
    key.zone = e->zone;
    key.start_ns = e->start_ns;
    PyObject *counters;
    if (e->counted == 3)
        counters = Py_BuildValue("(KKKK)", e->counters[0], e->counters[1], e->counters[2], e->counters[3]);
    else
        counters = Py_NewRef(Py_None);
    if (!counters)
        return NULL;
    return Py_BuildValue("(y#y#y#HKKNkkB)", (const char *)&key, (Py_ssize_t)sizeof key,
                         (const char *)&e->orig, (Py_ssize_t)sizeof e->orig,
                         (const char *)&e->reply, (Py_ssize_t)sizeof e->reply,
                         e->zone, e->start_ns, e->stop_ns, counters, (unsigned long)e->status,
                         (unsigned long)e->mark, e->tcp_state);
}

static PyObject *parse_ends(PyObject *module, PyObject *args) {
    Py_buffer view;
    Py_ssize_t offset, length;
    unsigned long netns;
    PyObject *out;
    if (!PyArg_ParseTuple(args, "y*nnkO!:parse_ends", &view, &offset, &length, &netns, &PyList_Type, &out))
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
                PyObject *item = end_tuple(&e, (u32)netns);
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

static PyMethodDef methods[] = {
    {"parse_ends", parse_ends, METH_VARARGS,
     "parse_ends(buffer, offset, length, netns, out): append the datagram's flow ends to out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ctends", "Conntrack DESTROY events read into the probe's structs.", -1, methods,
};

PyMODINIT_FUNC PyInit__ctends(void) {
    return PyModule_Create(&module);
}
