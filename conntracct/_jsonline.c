/* The documented JSON record of a flow event, one line (docs/record-fields.md).
 *
 * conntracct.sinks.records.json_line is this function: the stdout/file sink
 * writes every record of a busy host with it, and in Python it was the
 * largest single cost per finished flow (bench/README.md, issue 14).  What a
 * name or text means stays defined in Python and is handed in once by
 * configure(): the flags' JSON, the end reasons' JSON, the label and string
 * encoders for anything unusual; the event's own properties (proto_name,
 * nat, tcp_state_name, end_reason) are read as properties.  FlowEvent's
 * fields are read straight from its slots (as probe/_decode.c writes them),
 * and the part a record's kind, TCP state and flags decide is kept per
 * combination: both were most of a record's cost.  Its reference,
 * the record's dict encoded by the json module, is tests/reference/records.py;
 * tests/unit/test_stdout_sink.py compares the two on thousands of events.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* -- what configure() hands in ------------------------------------------------ */
static PyObject *identity_key;     /* the key of the identity part in FlowEvent.memo */
static PyObject *flags_json;       /* callable: flags int -> JSON text */
static PyObject *end_reason_json;  /* dict: end reason code -> JSON text */
static PyObject *labels_json;      /* callable: labels dict -> JSON text (non-text values) */
static PyObject *encode_str;       /* callable: str -> JSON string (text UTF-8 cannot hold) */
static PyTypeObject *event_type;   /* FlowEvent: its slots are read directly */
static PyObject *kinds;            /* tuple: the record kinds, the tail cache's first index */

/* Attribute names, interned once. */
enum { A_KIND, A_MEMO, A_FLOW_ID, A_FAMILY, A_PROTO_NAME, A_PROTO, A_ORIG, A_REPLY, A_NAT,
       A_PACKETS_ORIG, A_BYTES_ORIG, A_PACKETS_REPLY, A_BYTES_REPLY,
       A_DELTA_PACKETS_ORIG, A_DELTA_BYTES_ORIG, A_DELTA_PACKETS_REPLY, A_DELTA_BYTES_REPLY,
       A_START_NS, A_STOP_NS, A_TS_NS, A_ZONE, A_MARK, A_NETNS, A_STATUS, A_TCP_STATE_NAME,
       A_FLAGS, A_END_REASON, A_LABELS, A_ICMP, A_TCP_STATE, A_COUNT };
static const char *attr_names[A_COUNT] = {
    "kind", "memo", "flow_id", "family", "proto_name", "proto", "orig", "reply", "nat",
    "packets_orig", "bytes_orig", "packets_reply", "bytes_reply",
    "delta_packets_orig", "delta_bytes_orig", "delta_packets_reply", "delta_bytes_reply",
    "start_ns", "stop_ns", "ts_ns", "zone", "mark", "netns", "status", "tcp_state_name",
    "flags", "end_reason", "labels", "icmp", "tcp_state"};
static PyObject *attrs[A_COUNT];
static Py_ssize_t slot_at[A_COUNT];   /* FlowEvent's slot offsets; 0: not a slot (a property) */

/* A new reference to attribute a of e: from FlowEvent's slot when it is
 * one (no attribute lookup), otherwise (a property, a subclass, an unset
 * slot) as Python reads it. */
static PyObject *get(PyObject *e, int a) {
    if (slot_at[a] && Py_IS_TYPE(e, event_type)) {
        PyObject *v = *(PyObject **)((char *)e + slot_at[a]);
        if (v)
            return Py_NewRef(v);
    }
    return PyObject_GetAttr(e, attrs[a]);
}

/* -- a growing byte buffer ------------------------------------------------------ */
typedef struct {
    char *p;
    Py_ssize_t len, cap;
    char local[1024];
} Buf;

static int grow(Buf *b, Py_ssize_t more) {
    Py_ssize_t cap = b->cap * 2 > b->len + more ? b->cap * 2 : b->len + more + 256;
    char *p = PyMem_Malloc(cap);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(p, b->p, b->len);
    if (b->p != b->local)
        PyMem_Free(b->p);
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int put(Buf *b, const char *s, Py_ssize_t n) {
    if (b->len + n > b->cap && grow(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

#define PUT(b, lit) put((b), (lit), (Py_ssize_t)sizeof(lit) - 1)

/* Text already JSON (a str from Python: the flags, an end reason, labels). */
static int put_text(Buf *b, PyObject *text) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(text, &n);
    if (s)
        return put(b, s, n);
    /* lone surrogates (from the encoder's fallback): kept, as Python keeps them */
    PyErr_Clear();
    PyObject *raw = PyUnicode_AsEncodedString(text, "utf-8", "surrogatepass");
    if (!raw)
        return -1;
    int rc = put(b, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw));
    Py_DECREF(raw);
    return rc;
}

static int put_called(Buf *b, PyObject *fn, PyObject *arg) {
    PyObject *text = PyObject_CallOneArg(fn, arg);
    if (!text)
        return -1;
    int rc = put_text(b, text);
    Py_DECREF(text);
    return rc;
}

/* A JSON string as json.encoder.encode_basestring makes it (ensure_ascii=False):
 * '"', '\\' and control characters escaped, everything else as it is. */
static int put_str(Buf *b, PyObject *s) {
    Py_ssize_t n;
    if (!PyUnicode_Check(s))
        return put_called(b, encode_str, s);     /* its own TypeError */
    const unsigned char *u = (const unsigned char *)PyUnicode_AsUTF8AndSize(s, &n);
    if (!u) {   /* lone surrogates: the encoder's own way */
        PyErr_Clear();
        return put_called(b, encode_str, s);
    }
    if (b->len + 3 + 6 * n > b->cap && grow(b, 3 + 6 * n) < 0)
        return -1;
    char *o = b->p + b->len;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = u[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        default:
            o += sprintf(o, "u%04x", c);
        }
    }
    *o++ = '"';
    b->len = o - b->p;
    return 0;
}

/* Decimal digits of x (snprintf's %llu costs more than the rest of a number's work). */
static int put_u64(Buf *b, unsigned long long x, int negative) {
    char tmp[24], *end = tmp + sizeof tmp, *p = end;
    do {
        *--p = (char)('0' + x % 10);
        x /= 10;
    } while (x);
    if (negative)
        *--p = '-';
    return put(b, p, end - p);
}

/* An int as f"{v:d}" writes it. */
static int put_int(Buf *b, PyObject *v) {
    int overflow;
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "json_line: expected an int, got %.50s", Py_TYPE(v)->tp_name);
        return -1;
    }
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (!overflow) {
        if (x == -1 && PyErr_Occurred())
            return -1;
        return x < 0 ? put_u64(b, -(unsigned long long)x, 1) : put_u64(b, (unsigned long long)x, 0);
    }
    if (overflow > 0) {
        unsigned long long ux = PyLong_AsUnsignedLongLong(v);
        if (!PyErr_Occurred())
            return put_u64(b, ux, 0);
        PyErr_Clear();
    }
    PyObject *text = PyObject_Str(v);    /* beyond 64 bits */
    if (!text)
        return -1;
    int rc = put_text(b, text);
    Py_DECREF(text);
    return rc;
}

static int put_attr_int(Buf *b, PyObject *e, int a) {
    PyObject *v = get(e, a);
    if (!v)
        return -1;
    int rc = put_int(b, v);
    Py_DECREF(v);
    return rc;
}

/* '"YYYY-MM-DDTHH:MM:SS' of a Unix second: records cluster within a few
 * seconds, so the last few are kept (the GIL guards this cache). */
#define SECOND_CACHE 4
static struct { unsigned long long second; char text[24]; int len; int used; } seconds[SECOND_CACHE];
static unsigned next_second;

static int put_second(Buf *b, unsigned long long second) {
    for (int i = 0; i < SECOND_CACHE; i++)
        if (seconds[i].used && seconds[i].second == second)
            return put(b, seconds[i].text, seconds[i].len);
    time_t t = (time_t)second;
    struct tm tm;
    if (!gmtime_r(&t, &tm)) {
        PyErr_SetString(PyExc_OverflowError, "json_line: time out of range");
        return -1;
    }
    unsigned slot = next_second++ % SECOND_CACHE;
    seconds[slot].len = (int)strftime(seconds[slot].text, sizeof seconds[slot].text, "\"%Y-%m-%dT%H:%M:%S", &tm);
    seconds[slot].second = second;
    seconds[slot].used = 1;
    return put(b, seconds[slot].text, seconds[slot].len);
}

/* '"YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ"' of wall-clock ns, or null for 0 when nullable. */
static int put_time(Buf *b, PyObject *ns_obj, int nullable) {
    unsigned long long ns = PyLong_AsUnsignedLongLong(ns_obj);
    if (PyErr_Occurred())
        return -1;
    if (!ns && nullable)
        return PUT(b, "null");
    char frac[13] = {'.', 0, 0, 0, 0, 0, 0, 0, 0, 0, 'Z', '"'};
    unsigned long long f = ns % 1000000000ULL;
    for (int i = 9; i >= 1; i--, f /= 10)
        frac[i] = (char)('0' + f % 10);
    return put_second(b, ns / 1000000000ULL) || put(b, frac, 12);
}

static int put_attr_time(Buf *b, PyObject *e, int a, int nullable) {
    PyObject *v = get(e, a);
    if (!v)
        return -1;
    int rc = put_time(b, v, nullable);
    Py_DECREF(v);
    return rc;
}

/* {"src":..,"dst":..,"sport":..,"dport":..} of a FlowTuple. */
static int put_tuple(Buf *b, PyObject *t) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 4) {
        PyErr_SetString(PyExc_TypeError, "json_line: a flow tuple must be (src, dst, sport, dport)");
        return -1;
    }
    if (PUT(b, "{\"src\":") || put_str(b, PyTuple_GET_ITEM(t, 0)) || PUT(b, ",\"dst\":")
        || put_str(b, PyTuple_GET_ITEM(t, 1)) || PUT(b, ",\"sport\":") || put_int(b, PyTuple_GET_ITEM(t, 2))
        || PUT(b, ",\"dport\":") || put_int(b, PyTuple_GET_ITEM(t, 3)) || PUT(b, "}"))
        return -1;
    return 0;
}

/* From "flow_id" to "nat": what only the flow's identity decides. */
static PyObject *identity_text(PyObject *e) {
    Buf b = {.len = 0, .cap = sizeof b.local};
    b.p = b.local;
    PyObject *out = NULL, *fid = NULL, *name = NULL, *orig = NULL, *reply = NULL, *nat = NULL;
    char tmp[32];
    if (!(fid = get(e, A_FLOW_ID)) || !(name = get(e, A_PROTO_NAME))
        || !(orig = get(e, A_ORIG)) || !(reply = get(e, A_REPLY))
        || !(nat = get(e, A_NAT)))
        goto done;
    unsigned long long id = PyLong_AsUnsignedLongLong(fid);
    if (PyErr_Occurred())
        goto done;
    int nat_true = PyObject_IsTrue(nat);
    if (nat_true < 0)
        goto done;
    static const char hex[] = "0123456789abcdef";
    for (int i = 15; i >= 0; i--, id >>= 4)
        tmp[i] = hex[id & 15];
    if (PUT(&b, "\"flow_id\":\"") || put(&b, tmp, 16)
        || PUT(&b, "\",\"family\":") || put_attr_int(&b, e, A_FAMILY) || PUT(&b, ",\"protocol\":")
        || put_str(&b, name) || PUT(&b, ",\"protocol_number\":") || put_attr_int(&b, e, A_PROTO)
        || PUT(&b, ",\"orig\":") || put_tuple(&b, orig) || PUT(&b, ",\"reply\":") || put_tuple(&b, reply)
        || (nat_true ? PUT(&b, ",\"nat\":true,") : PUT(&b, ",\"nat\":false,")))
        goto done;
    out = PyUnicode_DecodeUTF8(b.p, b.len, "surrogatepass");
done:
    Py_XDECREF(fid);
    Py_XDECREF(name);
    Py_XDECREF(orig);
    Py_XDECREF(reply);
    Py_XDECREF(nat);
    if (b.p != b.local)
        PyMem_Free(b.p);
    return out;
}

/* The identity part, from the flow's memo when it has one (made once per flow). */
static int put_identity(Buf *b, PyObject *e) {
    PyObject *memo = get(e, A_MEMO);
    if (!memo)
        return -1;
    PyObject *text = NULL;
    if (PyDict_Check(memo)) {
        text = PyDict_GetItemWithError(memo, identity_key);
        if (text)
            Py_INCREF(text);
        else if (!PyErr_Occurred() && (text = identity_text(e)) && PyDict_SetItem(memo, identity_key, text) < 0)
            Py_CLEAR(text);
    } else {
        text = identity_text(e);
    }
    Py_DECREF(memo);
    if (!text)
        return -1;
    int rc = put_text(b, text);
    Py_DECREF(text);
    return rc;
}

/* {"k":"v",...}: text labels here, anything else by the Python encoder. */
static int put_labels(Buf *b, PyObject *labels) {
    if (!PyDict_Check(labels))
        return put_called(b, labels_json, labels);
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(labels, &pos, &k, &v))
        if (!PyUnicode_Check(k) || !PyUnicode_Check(v))
            return put_called(b, labels_json, labels);
    if (PUT(b, "{"))
        return -1;
    pos = 0;
    int first = 1;
    while (PyDict_Next(labels, &pos, &k, &v)) {
        if ((!first && PUT(b, ",")) || put_str(b, k) || PUT(b, ":") || put_str(b, v))
            return -1;
        first = 0;
    }
    return PUT(b, "}");
}

static int put_icmp(Buf *b, PyObject *icmp) {
    if (icmp == Py_None)
        return 0;
    if (!PyTuple_Check(icmp) || PyTuple_GET_SIZE(icmp) != 3) {
        PyErr_SetString(PyExc_TypeError, "json_line: icmp must be (type, code, id) or None");
        return -1;
    }
    if (PUT(b, ",\"icmp\":{\"type\":") || put_int(b, PyTuple_GET_ITEM(icmp, 0)) || PUT(b, ",\"code\":")
        || put_int(b, PyTuple_GET_ITEM(icmp, 1)) || PUT(b, ",\"id\":") || put_int(b, PyTuple_GET_ITEM(icmp, 2))
        || PUT(b, "}"))
        return -1;
    return 0;
}

/* ,"tcp_state":..,"flags":..,"end_reason":.. from the event's properties. */
static int put_state_made(Buf *b, PyObject *e) {
    int rc = -1;
    PyObject *state = NULL, *flags = NULL, *reason = NULL;
    if (!(state = get(e, A_TCP_STATE_NAME)) || !(flags = get(e, A_FLAGS)) || !(reason = get(e, A_END_REASON)))
        goto done;
    int has_state = PyObject_IsTrue(state);
    if (has_state < 0)
        goto done;
    if (PUT(b, ",\"tcp_state\":") || (has_state ? put_str(b, state) : PUT(b, "null")) || PUT(b, ",\"flags\":")
        || put_called(b, flags_json, flags) || PUT(b, ",\"end_reason\":"))
        goto done;
    PyObject *reason_text = PyDict_GetItemWithError(end_reason_json, reason);
    if (reason_text ? put_text(b, reason_text) : (PyErr_Occurred() ? -1 : PUT(b, "null")))
        goto done;
    rc = 0;
done:
    Py_XDECREF(state);
    Py_XDECREF(flags);
    Py_XDECREF(reason);
    return rc;
}

/* That part depends only on the record's kind, whether it is TCP, its TCP
 * state and its flags (FlowEvent.tcp_state_name and .end_reason, and
 * flags_json, read no other field): it is made once per combination and
 * kept (the GIL guards this cache; configure() empties it). */
#define KIND_SLOTS 3
#define STATE_SLOTS 16
#define FLAG_SLOTS 64
static PyObject *state_parts[KIND_SLOTS][2][STATE_SLOTS][FLAG_SLOTS];

static int kind_index(PyObject *kind) {
    Py_ssize_t n = PyTuple_GET_SIZE(kinds) < KIND_SLOTS ? PyTuple_GET_SIZE(kinds) : KIND_SLOTS;
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyTuple_GET_ITEM(kinds, i) == kind)
            return (int)i;
    for (Py_ssize_t i = 0; PyUnicode_CheckExact(kind) && i < n; i++)
        if (PyUnicode_Compare(PyTuple_GET_ITEM(kinds, i), kind) == 0)
            return (int)i;
    return -1;
}

/* The cache entry of e's combination, or NULL when e has none (unusual values). */
static PyObject **state_part_of(PyObject *e) {
    PyObject *kind = get(e, A_KIND), *proto = get(e, A_PROTO), *state = get(e, A_TCP_STATE),
             *flags = get(e, A_FLAGS);
    PyObject **slot = NULL;
    if (kind && proto && state && flags && PyLong_CheckExact(proto) && PyLong_CheckExact(state)
        && PyLong_CheckExact(flags)) {
        long p = PyLong_AsLong(proto), s = PyLong_AsLong(state), f = PyLong_AsLong(flags);
        int k = kind_index(kind);
        if (!PyErr_Occurred() && k >= 0 && s >= 0 && s < STATE_SLOTS && f >= 0 && f < FLAG_SLOTS)
            slot = &state_parts[k][p == 6][s][f];
    }
    PyErr_Clear();   /* whatever failed here fails again, reported, in put_state_made() */
    Py_XDECREF(kind);
    Py_XDECREF(proto);
    Py_XDECREF(state);
    Py_XDECREF(flags);
    return slot;
}

static int put_state(Buf *b, PyObject *e) {
    PyObject **slot = state_part_of(e);
    if (slot && *slot)
        return put(b, PyBytes_AS_STRING(*slot), PyBytes_GET_SIZE(*slot));
    Py_ssize_t from = b->len;
    if (put_state_made(b, e))
        return -1;
    if (slot && !(*slot = PyBytes_FromStringAndSize(b->p + from, b->len - from)))
        return -1;
    return 0;
}

static void forget_state_parts(void) {
    PyObject **all = &state_parts[0][0][0][0];
    for (size_t i = 0; i < sizeof state_parts / sizeof *all; i++)
        Py_CLEAR(all[i]);
}

/* "tcp_state" .. "labels" and "icmp": the values that are not plain numbers. */
static int put_tail(Buf *b, PyObject *e) {
    int rc = -1;
    PyObject *labels = NULL, *icmp = NULL;
    if (put_state(b, e) || !(labels = get(e, A_LABELS)) || !(icmp = get(e, A_ICMP)))
        goto done;
    int has_labels = PyObject_IsTrue(labels);
    if (has_labels < 0)
        goto done;
    if (PUT(b, ",\"labels\":") || (has_labels ? put_labels(b, labels) : PUT(b, "{}")) || put_icmp(b, icmp))
        goto done;
    rc = 0;
done:
    Py_XDECREF(labels);
    Py_XDECREF(icmp);
    return rc;
}

/* Plain numbers in line order: (attribute, the text before it). */
static const struct { int attr; const char *before; } COUNTERS[] = {
    {A_PACKETS_ORIG, "\"packets_orig\":"}, {A_BYTES_ORIG, ",\"bytes_orig\":"},
    {A_PACKETS_REPLY, ",\"packets_reply\":"}, {A_BYTES_REPLY, ",\"bytes_reply\":"},
    {A_DELTA_PACKETS_ORIG, ",\"delta_packets_orig\":"}, {A_DELTA_BYTES_ORIG, ",\"delta_bytes_orig\":"},
    {A_DELTA_PACKETS_REPLY, ",\"delta_packets_reply\":"}, {A_DELTA_BYTES_REPLY, ",\"delta_bytes_reply\":"},
};
static const struct { int attr; const char *before; } PLACE[] = {
    {A_ZONE, ",\"zone\":"}, {A_MARK, ",\"mark\":"}, {A_NETNS, ",\"netns\":"}, {A_STATUS, ",\"status\":"},
};

static int put_line(Buf *b, PyObject *e) {
    PyObject *kind = get(e, A_KIND);
    if (!kind)
        return -1;
    int rc = PUT(b, "{\"kind\":") || put_str(b, kind) || PUT(b, ",") || put_identity(b, e);
    Py_DECREF(kind);
    if (rc)
        return -1;
    for (size_t i = 0; i < sizeof COUNTERS / sizeof COUNTERS[0]; i++)
        if (put(b, COUNTERS[i].before, strlen(COUNTERS[i].before)) || put_attr_int(b, e, COUNTERS[i].attr))
            return -1;
    if (PUT(b, ",\"start\":") || put_attr_time(b, e, A_START_NS, 1) || PUT(b, ",\"start_ns\":")
        || put_attr_int(b, e, A_START_NS) || PUT(b, ",\"stop\":") || put_attr_time(b, e, A_STOP_NS, 1)
        || PUT(b, ",\"stop_ns\":") || put_attr_int(b, e, A_STOP_NS) || PUT(b, ",\"timestamp\":")
        || put_attr_time(b, e, A_TS_NS, 0) || PUT(b, ",\"timestamp_ns\":") || put_attr_int(b, e, A_TS_NS))
        return -1;
    for (size_t i = 0; i < sizeof PLACE / sizeof PLACE[0]; i++)
        if (put(b, PLACE[i].before, strlen(PLACE[i].before)) || put_attr_int(b, e, PLACE[i].attr))
            return -1;
    return put_tail(b, e) || PUT(b, "}\n");
}

static PyObject *json_line(PyObject *module, PyObject *e) {
    if (!identity_key) {
        PyErr_SetString(PyExc_RuntimeError, "json_line: configure() was not called");
        return NULL;
    }
    Buf b = {.len = 0, .cap = sizeof b.local};
    b.p = b.local;
    PyObject *out = put_line(&b, e) ? NULL : PyUnicode_DecodeUTF8(b.p, b.len, "surrogatepass");
    if (b.p != b.local)
        PyMem_Free(b.p);
    return out;
}

/* The offset of each attribute that is one of the class's slots (0 for the others). */
static int find_slots(PyTypeObject *type) {
    for (int i = 0; i < A_COUNT; i++) {
        PyObject *d = PyObject_GetAttr((PyObject *)type, attrs[i]);
        if (!d)
            return -1;
        slot_at[i] = Py_IS_TYPE(d, &PyMemberDescr_Type) && ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX
                         ? ((PyMemberDescrObject *)d)->d_member->offset : 0;
        Py_DECREF(d);
    }
    return 0;
}

static PyObject *configure(PyObject *module, PyObject *args) {
    PyObject *type, *kind_names, *key, *flags, *reasons, *labels, *str;
    if (!PyArg_ParseTuple(args, "O!O!OOO!OO:configure", &PyType_Type, &type, &PyTuple_Type, &kind_names, &key,
                          &flags, &PyDict_Type, &reasons, &labels, &str))
        return NULL;
    if (find_slots((PyTypeObject *)type) < 0)
        return NULL;
    PyObject **slots[] = {(PyObject **)&event_type, &kinds, &identity_key, &flags_json, &end_reason_json,
                          &labels_json, &encode_str};
    PyObject *values[] = {type, kind_names, key, flags, reasons, labels, str};
    for (int i = 0; i < 7; i++) {
        Py_INCREF(values[i]);
        Py_XSETREF(*slots[i], values[i]);
    }
    forget_state_parts();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"json_line", json_line, METH_O, "json_line(event) -> the event's documented JSON record, one line."},
    {"configure", configure, METH_VARARGS,
     "configure(FlowEvent, kinds, identity_key, flags_json, end_reason_json, labels_json, encode_str): "
     "the Python side's definitions."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_jsonline",
                                        "The JSON line of a flow event, compiled.", -1, methods};

PyMODINIT_FUNC PyInit__jsonline(void) {
    for (int i = 0; i < A_COUNT; i++)
        if (!attrs[i] && !(attrs[i] = PyUnicode_InternFromString(attr_names[i])))
            return NULL;
    return PyModule_Create(&module_def);
}
