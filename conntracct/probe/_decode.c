/* decode(): one probe record (struct flow_record, bpf/record.h) -> FlowEvent.
 *
 * conntracct.probe.record.decode is this function: it runs for every record
 * (the ring's NEWs and UPDATEs, and every flow end netfilter mode packs), and
 * in Python it was a few microseconds of each finished flow (bench/README.md,
 * issue 14).  The record's layout is bpf/record.h itself, included here; what
 * a value means stays defined in Python and is handed in once by configure():
 * the event and tuple classes, kind names, address texts (memoised there),
 * the ICMP protocols, address families and the flow id.  A flow's records
 * repeat its identity (tuples, netns, zone, mark, start), so what derives from
 * it alone -- tuples as text, flow id, and the FlowEvent.memo the sinks share
 * -- is worked out once per flow and kept in a bounded dict, as before.  Its
 * reference, the slow and obvious decoder, is tests/reference/record.py;
 * tests/unit/test_decode.py compares the two on thousands of records.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <arpa/inet.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
#include "../../bpf/record.h"

/* -- what configure() hands in ------------------------------------------------ */
static PyTypeObject *event_type;   /* FlowEvent (slots) */
static PyTypeObject *tuple_type;   /* FlowTuple (a namedtuple) */
static PyObject *kind_names;       /* dict: kind code -> name */
static PyObject *family_number;    /* dict: AF_* -> 4 or 6 */
static PyObject *flow_id;          /* callable: (orig bytes, zone, netns, start) -> int */
static PyObject *flows;            /* dict: identity bytes -> identity tuple (the memo) */
static Py_ssize_t memo_limit;      /* flows; past it the memo starts over (bounded memory) */

/* FlowEvent's slots: where each field lives in the object (its member descriptor's offset). */
enum { F_KIND, F_FLOW_ID, F_FAMILY, F_PROTO, F_ORIG, F_REPLY, F_PACKETS_ORIG, F_BYTES_ORIG, F_PACKETS_REPLY,
       F_BYTES_REPLY, F_DELTA_PACKETS_ORIG, F_DELTA_BYTES_ORIG, F_DELTA_PACKETS_REPLY, F_DELTA_BYTES_REPLY,
       F_START_NS, F_STOP_NS, F_TS_NS, F_ZONE, F_MARK, F_NETNS, F_STATUS, F_TCP_STATE, F_FLAGS, F_ICMP,
       F_LABELS, F_MEMO, F_COUNT };
static const char *field_names[F_COUNT] = {
    "kind", "flow_id", "family", "proto", "orig", "reply", "packets_orig", "bytes_orig", "packets_reply",
    "bytes_reply", "delta_packets_orig", "delta_bytes_orig", "delta_packets_reply", "delta_bytes_reply",
    "start_ns", "stop_ns", "ts_ns", "zone", "mark", "netns", "status", "tcp_state", "flags", "icmp",
    "labels", "memo"};
static Py_ssize_t field_at[F_COUNT];

/* The identity: from the original tuple to the zone. */
#define IDENTITY_AT offsetof(struct flow_record, orig)
#define IDENTITY_END (offsetof(struct flow_record, zone) + sizeof(((struct flow_record *)0)->zone))

/* Set a slot, taking the reference (NULL: an error already raised). */
static inline int set(PyObject *e, int f, PyObject *v) {
    if (!v)
        return -1;
    PyObject **slot = (PyObject **)((char *)e + field_at[f]);
    Py_XSETREF(*slot, v);
    return 0;
}

static inline int set_u64(PyObject *e, int f, unsigned long long v) {
    return set(e, f, PyLong_FromUnsignedLongLong(v));
}

static PyObject *addresses[2];     /* AF_INET's and AF_INET6's text memo (raw 16 bytes -> text) */
static unsigned char is_icmp[256];

/* One struct ct_tuple as a FlowTuple; *icmp gets (type, code, id) for ICMP. */
static PyObject *flow_tuple(const struct ct_tuple *t, PyObject **icmp) {
    PyObject *texts = t->family == AF_INET ? addresses[0] : t->family == AF_INET6 ? addresses[1] : NULL;
    if (!texts)
        return PyErr_Format(PyExc_ValueError, "record with unknown address family %d", t->family);
    PyObject *out = tuple_type->tp_alloc(tuple_type, 4);
    if (!out)
        return NULL;
    PyObject *raw;
    for (int i = 0; i < 2; i++) {
        if (!(raw = PyBytes_FromStringAndSize((const char *)(i ? t->dst : t->src), sizeof t->src)))
            goto fail;
        PyObject *text = PyObject_GetItem(texts, raw);
        Py_DECREF(raw);
        if (!text)
            goto fail;
        PyTuple_SET_ITEM(out, i, text);
    }
    long sport = ntohs(t->src_u), dport = ntohs(t->dst_u);
    if (is_icmp[t->proto]) {
        /* dst_u holds type then code in memory order; src_u is the echo id. */
        if (icmp && !(*icmp = Py_BuildValue("(iil)", t->dst_u & 0xFF, t->dst_u >> 8, sport)))
            goto fail;
        sport = dport = 0;
    } else if (icmp) {
        *icmp = Py_NewRef(Py_None);
    }
    PyTuple_SET_ITEM(out, 2, PyLong_FromLong(sport));
    PyTuple_SET_ITEM(out, 3, PyLong_FromLong(dport));
    if (!PyTuple_GET_ITEM(out, 2) || !PyTuple_GET_ITEM(out, 3))
        goto fail;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* (id_start, flow id, family 4/6, protocol, orig, reply, icmp, memo) of a record. */
static PyObject *identity(const struct flow_record *r, unsigned long long id_start) {
    PyObject *icmp = NULL, *orig = NULL, *reply = NULL, *fid = NULL, *out = NULL;
    if (!(orig = flow_tuple(&r->orig, &icmp)) || !(reply = flow_tuple(&r->reply, NULL)))
        goto done;
    fid = PyObject_CallFunction(flow_id, "y#IIK", (const char *)&r->orig, (Py_ssize_t)sizeof r->orig,
                                (unsigned)r->zone, (unsigned)r->netns, id_start);
    if (!fid)
        goto done;
    PyObject *family_key = PyLong_FromLong(r->orig.family);
    if (!family_key)
        goto done;
    PyObject *family = PyDict_GetItemWithError(family_number, family_key);   /* borrowed */
    if (!family && !PyErr_Occurred())
        PyErr_SetObject(PyExc_KeyError, family_key);
    Py_DECREF(family_key);
    if (family)
        out = Py_BuildValue("(KOOiOOON)", id_start, fid, family, r->orig.proto, orig, reply, icmp, PyDict_New());
done:
    Py_XDECREF(icmp);
    Py_XDECREF(orig);
    Py_XDECREF(reply);
    Py_XDECREF(fid);
    return out;
}

/* The flow's identity, memoised: the record's own when its start differs.
 * A DESTROY is a flow's last record: it takes the identity out of the memo,
 * which so holds live flows only. */
static PyObject *known_identity(const struct flow_record *r, const char *raw) {
    unsigned long long id_start = r->start_ns ? r->start_ns : r->first_seen;
    int last = r->kind == KIND_DESTROY;
    PyObject *key = PyBytes_FromStringAndSize(raw + IDENTITY_AT, IDENTITY_END - IDENTITY_AT);
    if (!key)
        return NULL;
    PyObject *found = PyDict_GetItemWithError(flows, key);    /* borrowed */
    if (found && PyTuple_Check(found) && PyTuple_GET_SIZE(found) == 8
        && PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(found, 0)) == id_start) {
        PyObject *known = Py_NewRef(found);
        if (last && PyDict_DelItem(flows, key) < 0)
            Py_CLEAR(known);
        Py_DECREF(key);
        return known;
    }
    PyErr_Clear();
    PyObject *known = identity(r, id_start);
    if (known && last) {
        if (found && PyDict_DelItem(flows, key) < 0)     /* an older flow's identity under this key */
            Py_CLEAR(known);
    } else if (known) {
        if (PyDict_GET_SIZE(flows) >= memo_limit)
            PyDict_Clear(flows);
        if (PyDict_SetItem(flows, key, known) < 0)
            Py_CLEAR(known);
    }
    Py_DECREF(key);
    return known;
}

static PyObject *event_from(const struct flow_record *r, const char *raw, PyObject *wall_offset) {
    PyObject *kind_key = PyLong_FromLong(r->kind);
    if (!kind_key)
        return NULL;
    PyObject *kind = PyDict_GetItemWithError(kind_names, kind_key);    /* borrowed */
    if (!kind) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, kind_key);
        Py_DECREF(kind_key);
        return NULL;
    }
    Py_DECREF(kind_key);
    PyObject *known = known_identity(r, raw);
    if (!known)
        return NULL;
    PyObject *e = event_type->tp_alloc(event_type, 0);
    if (!e) {
        Py_DECREF(known);
        return NULL;
    }
    static const int from_identity[] = {-1, F_FLOW_ID, F_FAMILY, F_PROTO, F_ORIG, F_REPLY, F_ICMP, F_MEMO};
    for (int i = 1; i < 8; i++)
        set(e, from_identity[i], Py_NewRef(PyTuple_GET_ITEM(known, i)));
    Py_DECREF(known);
    /* ts: the probe's clock; the event's: the wall clock */
    PyObject *ts = PyLong_FromUnsignedLongLong(r->ts);
    if (set(e, F_KIND, Py_NewRef(kind)) || !ts || set(e, F_TS_NS, PyNumber_Add(ts, wall_offset))
        || set_u64(e, F_START_NS, r->start_ns) || set_u64(e, F_STOP_NS, r->stop_ns)
        || set_u64(e, F_PACKETS_ORIG, r->packets[0]) || set_u64(e, F_PACKETS_REPLY, r->packets[1])
        || set_u64(e, F_BYTES_ORIG, r->bytes[0]) || set_u64(e, F_BYTES_REPLY, r->bytes[1])
        || set_u64(e, F_DELTA_PACKETS_ORIG, r->delta_packets[0])
        || set_u64(e, F_DELTA_PACKETS_REPLY, r->delta_packets[1])
        || set_u64(e, F_DELTA_BYTES_ORIG, r->delta_bytes[0]) || set_u64(e, F_DELTA_BYTES_REPLY, r->delta_bytes[1])
        || set_u64(e, F_STATUS, r->status) || set_u64(e, F_NETNS, r->netns) || set_u64(e, F_MARK, r->mark)
        || set_u64(e, F_ZONE, r->zone) || set_u64(e, F_TCP_STATE, r->tcp_state) || set_u64(e, F_FLAGS, r->flags)
        || set(e, F_LABELS, PyDict_New())) {
        Py_XDECREF(ts);
        Py_DECREF(e);
        return NULL;
    }
    Py_DECREF(ts);
    return e;
}

static PyObject *decode(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "decode(raw, wall_offset_ns) takes exactly these two arguments");
        return NULL;
    }
    if (!event_type) {
        PyErr_SetString(PyExc_RuntimeError, "decode: configure() was not called");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    struct flow_record r;
    PyObject *out = NULL;
    if (view.len < (Py_ssize_t)sizeof r) {
        PyErr_Format(PyExc_ValueError, "record of %zd bytes, a struct flow_record has %zu", view.len, sizeof r);
    } else {
        memcpy(&r, view.buf, sizeof r);
        out = event_from(&r, view.buf, args[1]);
    }
    PyBuffer_Release(&view);
    return out;
}

/* The byte offset of each FlowEvent field in its objects, from the class's slot descriptors. */
static int find_fields(PyTypeObject *type) {
    for (int i = 0; i < F_COUNT; i++) {
        PyObject *d = PyObject_GetAttrString((PyObject *)type, field_names[i]);
        if (!d)
            return -1;
        int ok = Py_IS_TYPE(d, &PyMemberDescr_Type)
                 && ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX;
        if (ok)
            field_at[i] = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_DECREF(d);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "decode: %s.%s is not a slot", type->tp_name, field_names[i]);
            return -1;
        }
    }
    return 0;
}

static PyObject *configure(PyObject *module, PyObject *args) {
    PyObject *event, *tuple, *kinds, *addr4, *addr6, *icmp, *families, *fid, *memo;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "O!O!O!OOOO!OO!n:configure", &PyType_Type, &event, &PyType_Type, &tuple,
                          &PyDict_Type, &kinds, &addr4, &addr6, &icmp, &PyDict_Type, &families, &fid,
                          &PyDict_Type, &memo, &limit))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)tuple, &PyTuple_Type))
        return PyErr_Format(PyExc_TypeError, "decode: the flow tuple class must be a tuple");
    if (find_fields((PyTypeObject *)event) < 0)
        return NULL;
    unsigned char icmp_table[256] = {0};
    for (int p = 0; p < 256; p++) {
        PyObject *n = PyLong_FromLong(p);
        int in = n ? PySequence_Contains(icmp, n) : -1;
        Py_XDECREF(n);
        if (in < 0)
            return NULL;
        icmp_table[p] = (unsigned char)in;
    }
    memcpy(is_icmp, icmp_table, sizeof is_icmp);
    PyObject **slots[] = {(PyObject **)&event_type, (PyObject **)&tuple_type, &kind_names, &addresses[0],
                          &addresses[1], &family_number, &flow_id, &flows};
    PyObject *values[] = {event, tuple, kinds, addr4, addr6, families, fid, memo};
    for (size_t i = 0; i < sizeof values / sizeof values[0]; i++)
        Py_XSETREF(*slots[i], Py_NewRef(values[i]));
    memo_limit = limit;
    Py_RETURN_NONE;
}

static PyObject *set_memo_limit(PyObject *module, PyObject *arg) {
    Py_ssize_t limit = PyLong_AsSsize_t(arg);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    memo_limit = limit;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode", (PyCFunction)(void (*)(void))decode, METH_FASTCALL,
     "decode(raw, wall_offset_ns) -> FlowEvent of one struct flow_record."},
    {"configure", configure, METH_VARARGS,
     "configure(FlowEvent, FlowTuple, kind_names, ipv4_texts, ipv6_texts, icmp_protos, family_numbers, "
     "flow_id, memo, memo_limit): the Python side's definitions."},
    {"set_memo_limit", set_memo_limit, METH_O, "set_memo_limit(flows): the identity memo's bound."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_decode",
                                        "Probe records decoded, compiled.", -1, methods};

PyMODINIT_FUNC PyInit__decode(void) {
    PyObject *m = PyModule_Create(&module_def);
    /* The layout as this file was compiled with it, for the drift test. */
    if (m && (PyModule_AddIntConstant(m, "RECORD_SIZE", sizeof(struct flow_record)) < 0
              || PyModule_AddIntConstant(m, "IDENTITY_AT", IDENTITY_AT) < 0
              || PyModule_AddIntConstant(m, "IDENTITY_END", IDENTITY_END) < 0))
        Py_CLEAR(m);
    return m;
}
