/* The probe's BPF ring buffer, read in batches through one mapping.
 *
 * BCC (libbpf's ring_buffer__consume) calls back into Python once per
 * record, ~1.7 us of ctypes each, and maps the data area twice (so a
 * record that wraps reads as one piece): a ring of N MiB is 2N MB of the
 * agent's RSS, since the kernel maps every page at mmap.  Here take()
 * returns up to `limit` records as a list of bytes in one call, and the
 * data area is mapped once: a record that wraps is copied in two pieces.
 *
 * The protocol is the kernel's (kernel/bpf/ringbuf.c) as libbpf reads it
 * (ringbuf_process_ring): the consumer position lives in the first page
 * (the only one user space may write), the producer position in the
 * second, then the data.  Each record starts with an 8-byte header whose
 * first word is its length with two flags: BUSY (reserved, not yet
 * submitted: stop there) and DISCARD (skip).  Records are 8-byte aligned.
 * The positions and the length are read with acquire loads, and the
 * consumer position is published with a release store once the records
 * are copied out.  bench/ring_read.py measures it against BCC's reader.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define RINGBUF_BUSY_BIT (1U << 31)
#define RINGBUF_DISCARD_BIT (1U << 30)
#define RINGBUF_HDR_SZ 8

typedef struct {
    PyObject_HEAD
    uint64_t *consumer_pos;          /* the consumer page, mapped writable */
    const char *producer_page;       /* the producer page and the data, mapped read-only */
    const char *data;
    size_t page_size, data_size;
    uint64_t mask;
} Ring;

static void ring_unmap(Ring *self)
{
    if (self->consumer_pos) {
        munmap(self->consumer_pos, self->page_size);
        self->consumer_pos = NULL;
    }
    if (self->producer_page) {
        munmap((void *)self->producer_page, self->page_size + self->data_size);
        self->producer_page = NULL;
        self->data = NULL;
    }
}

static int Ring_init(Ring *self, PyObject *args, PyObject *kwds)
{
    int fd;
    Py_ssize_t data_size;
    if (!PyArg_ParseTuple(args, "in:Ring", &fd, &data_size))
        return -1;
    ring_unmap(self);
    long page = sysconf(_SC_PAGESIZE);
    if (data_size <= 0 || (data_size & (data_size - 1)) || data_size % page) {
        PyErr_Format(PyExc_ValueError, "ring data size %zd is not a power of two of whole pages", data_size);
        return -1;
    }
    self->page_size = (size_t)page;
    self->data_size = (size_t)data_size;
    self->mask = (uint64_t)data_size - 1;
    void *consumer = mmap(NULL, self->page_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (consumer == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->consumer_pos = consumer;
    void *producer = mmap(NULL, self->page_size + self->data_size, PROT_READ, MAP_SHARED, fd, page);
    if (producer == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        ring_unmap(self);
        return -1;
    }
    self->producer_page = producer;
    self->data = (const char *)producer + self->page_size;
    return 0;
}

static void Ring_dealloc(Ring *self)
{
    ring_unmap(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* One record's sample (len bytes after the header at `pos`), copied out. */
static PyObject *copy_sample(Ring *self, uint64_t pos, uint32_t len)
{
    PyObject *sample = PyBytes_FromStringAndSize(NULL, len);
    if (!sample)
        return NULL;
    char *out = PyBytes_AS_STRING(sample);
    size_t at = (size_t)((pos + RINGBUF_HDR_SZ) & self->mask);
    size_t first = self->data_size - at < len ? self->data_size - at : len;
    memcpy(out, self->data + at, first);
    memcpy(out + first, self->data, len - first);
    return sample;
}

static PyObject *Ring_take(Ring *self, PyObject *arg)
{
    Py_ssize_t limit = PyLong_AsSsize_t(arg);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    if (!self->data) {
        PyErr_SetString(PyExc_ValueError, "ring is closed");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    uint64_t cons = __atomic_load_n(self->consumer_pos, __ATOMIC_ACQUIRE);
    uint64_t prod = __atomic_load_n((const uint64_t *)self->producer_page, __ATOMIC_ACQUIRE);
    while (cons < prod && PyList_GET_SIZE(out) < limit) {
        const uint32_t *header = (const uint32_t *)(self->data + (cons & self->mask));
        uint32_t len = __atomic_load_n(header, __ATOMIC_ACQUIRE);
        if (len & RINGBUF_BUSY_BIT)
            break;
        uint32_t sample_len = len & ~RINGBUF_DISCARD_BIT;
        if (!(len & RINGBUF_DISCARD_BIT)) {
            PyObject *sample = copy_sample(self, cons, sample_len);
            if (!sample || PyList_Append(out, sample) < 0) {
                Py_XDECREF(sample);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(sample);
        }
        cons += ((uint64_t)sample_len + RINGBUF_HDR_SZ + 7) & ~(uint64_t)7;
        if (cons == prod)
            prod = __atomic_load_n((const uint64_t *)self->producer_page, __ATOMIC_ACQUIRE);
    }
    __atomic_store_n(self->consumer_pos, cons, __ATOMIC_RELEASE);
    return out;
}

static PyObject *Ring_close(Ring *self, PyObject *Py_UNUSED(ignored))
{
    ring_unmap(self);
    Py_RETURN_NONE;
}

static PyMethodDef Ring_methods[] = {
    {"take", (PyCFunction)Ring_take, METH_O,
     "take(limit) -> list of bytes: up to `limit` records queued now, consumed."},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, "Unmap the ring."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "conntracct.probe._ring.Ring",
    .tp_doc = "Ring(map_fd, data_size): a BPF ring buffer map, mapped for reading.",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
};

static struct PyModuleDef ring_module = {
    PyModuleDef_HEAD_INIT, "_ring", "The probe's BPF ring buffer, read in batches.", -1, NULL,
};

PyMODINIT_FUNC PyInit__ring(void)
{
    if (PyType_Ready(&RingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&ring_module);
    if (!m)
        return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
