/*
 * nbdcache.tier._pages: the per-page inner loops of the RAM tier, in C.
 *
 * Python spends more time stepping through a request page by page than lz4
 * spends compressing it (see bench/README.md).  This module owns the two
 * loops that touch every byte of a page, and runs each over a whole request
 * in one call with the GIL released:
 *
 *   encode  - classify and compress a run of pages the way codec.py does
 *             (zero/same-filled pages first, lz4 block format without a
 *             size prefix, the incompressible threshold);
 *   decode  - expand a run of pages from the page table and the arena into
 *             one reply buffer (holes, zero and same-filled pages, raw and
 *             lz4 pages, objects split across two frames included).
 *
 * Allocation, the LRU and every state change stay in Python: this module
 * reads the page table and the arena and writes only the caller's buffers.
 * The output is the same lz4 block format the lz4 package reads and writes,
 * so pages move freely between this path and the pure-Python one.  The
 * constants below must match nbdcache/tier/__init__.py and arena.py; the
 * Python side checks them at import.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <lz4.h>
#include <stdint.h>
#include <string.h>

#define PAGE_SIZE 4096
#define ST_HOLE 0
#define ST_ZERO 1
#define ST_SAME 2
#define ST_RAM 3
#define ST_DISK 4
#define HANDLE_SHIFT 14
#define HANDLE_LENGTH_MASK ((1u << 13) - 1)
#define HANDLE_SPLIT (1u << 13)

/* A page is one 8-byte word repeated iff it equals itself shifted by 8. */
static int
filled(const unsigned char *page, uint64_t *word)
{
    if (page[0] != page[8] || memcmp(page, page + 8, PAGE_SIZE - 8) != 0)
        return 0;
    memcpy(word, page, 8); /* little-endian hosts only: checked at import */
    return 1;
}

/* Needs no Python state: runs on the caller's thread or on an Encoder's. */
static void
encode_loop(const unsigned char *src, Py_ssize_t n, int threshold, char *out, int32_t *sizes,
            uint64_t *words)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *page = src + i * PAGE_SIZE;
        if (filled(page, &words[i])) {
            sizes[i] = -1;
            continue;
        }
        int c = LZ4_compress_default((const char *)page, out + i * PAGE_SIZE, PAGE_SIZE, threshold);
        sizes[i] = c > 0 ? c : PAGE_SIZE;
    }
}

/* Checks shared by encode() and Encoder.submit(). */
static int
check_encode_args(Py_buffer *src, int threshold, Py_buffer *out, Py_buffer *sizes,
                  Py_buffer *words)
{
    Py_ssize_t n = src->len / PAGE_SIZE;
    if (src->len % PAGE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "source is not a whole number of pages");
    } else if (threshold <= 0 || threshold >= PAGE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "threshold must be in 1..4095");
    } else if (out->len < n * PAGE_SIZE || sizes->len < n * 4 || words->len < n * 8
               || sizes->itemsize != 4 || words->itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "output buffers are too small or of the wrong type");
    } else {
        return 0;
    }
    return -1;
}

PyDoc_STRVAR(encode_doc,
"encode(src, threshold, out, sizes, words) -> None\n\n"
"For page i of `src` (a whole number of pages): sizes[i] = -1 and\n"
"words[i] = the repeated word if the page is zero or same-filled; else the\n"
"lz4 block of the page is at out[i*4096:] and sizes[i] is its length, or\n"
"4096 if it would exceed `threshold` (the page is kept raw).  `sizes` is an\n"
"int32 buffer and `words` a uint64 buffer of at least as many items.");

static PyObject *
encode(PyObject *self, PyObject *args)
{
    Py_buffer src, out, sizes, words;
    int threshold;
    if (!PyArg_ParseTuple(args, "y*iw*w*w*", &src, &threshold, &out, &sizes, &words))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = src.len / PAGE_SIZE;
    if (check_encode_args(&src, threshold, &out, &sizes, &words) == 0) {
        Py_BEGIN_ALLOW_THREADS
        encode_loop(src.buf, n, threshold, out.buf, sizes.buf, words.buf);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    PyBuffer_Release(&sizes);
    PyBuffer_Release(&words);
    return result;
}

PyDoc_STRVAR(encode_page_doc,
"encode_page(page, threshold, out) -> int\n\n"
"encode() of one page, for the single-page write path: -1 if `page` is zero\n"
"or same-filled (its first 8 bytes are the word), else the length of its lz4\n"
"block in `out`, or 4096 if that would exceed `threshold` (kept raw).");

static PyObject *
encode_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "encode_page() takes 3 arguments");
        return NULL;
    }
    long threshold = PyLong_AsLong(args[1]);
    if (threshold == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer src, out;
    if (PyObject_GetBuffer(args[0], &src, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[2], &out, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    PyObject *result = NULL;
    if (src.len != PAGE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "a page is 4096 bytes");
    } else if (threshold <= 0 || threshold >= PAGE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "threshold must be in 1..4095");
    } else if (out.len < threshold) {
        PyErr_SetString(PyExc_ValueError, "output buffer is smaller than the threshold");
    } else if ((char *)out.buf < (char *)src.buf + src.len
               && (char *)src.buf < (char *)out.buf + out.len) {
        PyErr_SetString(PyExc_ValueError, "the output overlaps the page");
    } else {
        uint64_t word;
        int size;
        /* One page compresses in about a microsecond: not worth the GIL's
         * round trip. */
        if (filled(src.buf, &word))
            size = -1;
        else {
            size = LZ4_compress_default(src.buf, out.buf, PAGE_SIZE, (int)threshold);
            if (size <= 0)
                size = PAGE_SIZE;
        }
        result = PyLong_FromLong(size);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(decode_doc,
"decode(state, handles, arena, first, count, out, spans=None) -> int\n\n"
"Expand pages first, first+1, ... into out[0:], out[4096:], ... and stop at\n"
"the first page this path does not serve (DISK, or an object split across\n"
"frames when `spans` is not given) or after `count`; returns how many pages\n"
"were written.  `state` is the page table's state bytes, `handles` its\n"
"uint64 handles; `spans` (int32, one per frame) names the frame that\n"
"continues each frame, as zsmalloc's zs_next does.  Raises ValueError if\n"
"an object in the arena does not expand to a page.");

static PyObject *
decode(PyObject *self, PyObject *args)
{
    Py_buffer state, handles, arena, out, spans = {NULL};
    Py_ssize_t first, count;
    PyObject *spans_obj = Py_None;
    if (!PyArg_ParseTuple(args, "y*y*y*nnw*|O", &state, &handles, &arena, &first, &count, &out,
                          &spans_obj))
        return NULL;
    PyObject *result = NULL;
    int have_spans = 0;
    Py_ssize_t done = 0, bad = -1;
    if (spans_obj != Py_None) {
        if (PyObject_GetBuffer(spans_obj, &spans, PyBUF_SIMPLE) < 0)
            goto end;
        have_spans = 1;
        if (spans.itemsize != 4) {
            PyErr_SetString(PyExc_ValueError, "spans must be a buffer of int32");
            goto end;
        }
    }
    /* Compared by subtraction and division: no sum or product can overflow. */
    if (first < 0 || count < 0 || first > state.len || count > state.len - first
        || first > handles.len / 8 || count > handles.len / 8 - first
        || count > out.len / PAGE_SIZE || handles.itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "page range outside the table or the output");
        goto end;
    }
    const unsigned char *st = state.buf;
    const uint64_t *h = handles.buf;
    const char *a = arena.buf;
    char *o = out.buf;
    const int32_t *next = have_spans ? spans.buf : NULL;
    Py_ssize_t frames = have_spans ? spans.len / 4 : 0;
    char joined[PAGE_SIZE]; /* a split object, made whole */
    Py_BEGIN_ALLOW_THREADS
    for (; done < count; done++) {
        Py_ssize_t pgno = first + done;
        char *dst = o + done * PAGE_SIZE;
        unsigned char s = st[pgno];
        if (s == ST_HOLE || s == ST_ZERO) {
            memset(dst, 0, PAGE_SIZE);
        } else if (s == ST_SAME) {
            for (int k = 0; k < PAGE_SIZE; k += 8)
                memcpy(dst + k, &h[pgno], 8);
        } else if (s == ST_RAM) {
            uint64_t handle = h[pgno];
            Py_ssize_t size = (Py_ssize_t)(handle & HANDLE_LENGTH_MASK);
            Py_ssize_t addr = (Py_ssize_t)(handle >> HANDLE_SHIFT);
            const char *src = a + addr;
            if (handle & HANDLE_SPLIT) {
                /* The object runs from its frame's tail into the frame that
                 * continues it: gather the two pieces (zsmalloc's read_span). */
                if (next == NULL)
                    break;
                Py_ssize_t cut = PAGE_SIZE - (addr % PAGE_SIZE);
                Py_ssize_t frame = addr / PAGE_SIZE;
                Py_ssize_t more = frame < frames ? next[frame] : -1;
                if (size > PAGE_SIZE || cut >= size || addr > arena.len - cut || more < 0
                    || more > (arena.len - (size - cut)) / PAGE_SIZE) {
                    bad = pgno;
                    break;
                }
                memcpy(joined, src, cut);
                memcpy(joined + cut, a + more * PAGE_SIZE, size - cut);
                src = joined;
            } else if (size > PAGE_SIZE || addr > arena.len - size) {
                bad = pgno;
                break;
            }
            if (size == PAGE_SIZE) {
                memcpy(dst, src, PAGE_SIZE);
            } else if (LZ4_decompress_safe(src, dst, (int)size, PAGE_SIZE) != PAGE_SIZE) {
                bad = pgno;
                break;
            }
        } else {
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (bad >= 0)
        PyErr_Format(PyExc_ValueError, "page %zd: its arena copy does not expand to a page", bad);
    else
        result = PyLong_FromSsize_t(done);
end:
    PyBuffer_Release(&state);
    PyBuffer_Release(&handles);
    PyBuffer_Release(&arena);
    PyBuffer_Release(&out);
    if (have_spans)
        PyBuffer_Release(&spans);
    return result;
}

/*
 * Encoder: the same encode loop on a thread of its own, which never takes
 * the GIL.  The event loop submits a run with buffers it allocated, goes on
 * parsing and answering, and collects finished runs when the eventfd
 * `fd` becomes readable.  Each job holds its buffers (Py_buffer views, so
 * the objects stay alive and cannot be resized) until it is collected.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

typedef struct job {
    struct job *next;
    long long id;
    int threshold;
    Py_buffer src, out, sizes, words;
} job;

typedef struct {
    PyObject_HEAD
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    job *todo, *todo_tail, *done, *done_tail;
    int efd;
    int started;
    int closing;
} Encoder;

static void
release_job(job *j)
{
    PyBuffer_Release(&j->src);
    PyBuffer_Release(&j->out);
    PyBuffer_Release(&j->sizes);
    PyBuffer_Release(&j->words);
    PyMem_RawFree(j);
}

static void *
encoder_thread(void *arg)
{
    Encoder *e = arg;
    pthread_mutex_lock(&e->lock);
    for (;;) {
        while (e->todo == NULL && !e->closing)
            pthread_cond_wait(&e->wake, &e->lock);
        if (e->todo == NULL)
            break; /* closing, and nothing left to do */
        job *j = e->todo;
        e->todo = j->next;
        if (e->todo == NULL)
            e->todo_tail = NULL;
        pthread_mutex_unlock(&e->lock);
        encode_loop(j->src.buf, j->src.len / PAGE_SIZE, j->threshold, j->out.buf, j->sizes.buf,
                    j->words.buf);
        pthread_mutex_lock(&e->lock);
        j->next = NULL;
        if (e->done_tail)
            e->done_tail->next = j;
        else
            e->done = j;
        e->done_tail = j;
        uint64_t one = 1;
        while (write(e->efd, &one, sizeof one) < 0 && errno == EINTR)
            ;
    }
    pthread_mutex_unlock(&e->lock);
    return NULL;
}

static PyObject *
Encoder_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (!PyArg_ParseTuple(args, ":Encoder"))
        return NULL;
    Encoder *e = (Encoder *)type->tp_alloc(type, 0);
    if (e == NULL)
        return NULL;
    e->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (e->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(e);
        return NULL;
    }
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->wake, NULL);
    /* The thread starts with the asynchronous signals blocked, so SIGTERM,
     * SIGHUP (reload) and the like are delivered to the interpreter's
     * threads.  Faults raised by the thread itself stay deliverable, so
     * faulthandler can still report them.  If the mask cannot be set the
     * thread runs with the caller's: signals still reach CPython's handler. */
    sigset_t async, old;
    sigfillset(&async);
    sigdelset(&async, SIGSEGV);
    sigdelset(&async, SIGBUS);
    sigdelset(&async, SIGFPE);
    sigdelset(&async, SIGILL);
    sigdelset(&async, SIGABRT);
    int masked = pthread_sigmask(SIG_BLOCK, &async, &old) == 0;
    int err = pthread_create(&e->thread, NULL, encoder_thread, e);
    if (masked)
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(e);
        return NULL;
    }
    e->started = 1;
    return (PyObject *)e;
}

/* Stop the thread (it finishes what was submitted) and drop every job. */
static void
encoder_stop(Encoder *e)
{
    if (e->started) {
        pthread_mutex_lock(&e->lock);
        e->closing = 1;
        pthread_cond_signal(&e->wake);
        pthread_mutex_unlock(&e->lock);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(e->thread, NULL);
        Py_END_ALLOW_THREADS
        e->started = 0;
    }
    while (e->done) {
        job *j = e->done;
        e->done = j->next;
        release_job(j);
    }
    e->done_tail = NULL;
}

static void
Encoder_dealloc(Encoder *e)
{
    encoder_stop(e);
    if (e->efd >= 0) {
        close(e->efd);
        e->efd = -1;
        pthread_mutex_destroy(&e->lock);
        pthread_cond_destroy(&e->wake);
    }
    Py_TYPE(e)->tp_free((PyObject *)e);
}

PyDoc_STRVAR(submit_doc,
"submit(id, src, threshold, out, sizes, words) -> None\n\n"
"Queue encode(src, threshold, out, sizes, words) for the encoder's thread;\n"
"`collect` returns `id` once it is done.  The buffers must not change until then.");

static PyObject *
Encoder_submit(Encoder *e, PyObject *args)
{
    if (!e->started || e->closing) {
        PyErr_SetString(PyExc_ValueError, "the encoder is closed");
        return NULL;
    }
    job *j = PyMem_RawCalloc(1, sizeof *j);
    if (j == NULL)
        return PyErr_NoMemory();
    if (!PyArg_ParseTuple(args, "Ly*iw*w*w*", &j->id, &j->src, &j->threshold, &j->out,
                          &j->sizes, &j->words)) {
        PyMem_RawFree(j);
        return NULL;
    }
    if (check_encode_args(&j->src, j->threshold, &j->out, &j->sizes, &j->words) < 0) {
        release_job(j);
        return NULL;
    }
    pthread_mutex_lock(&e->lock);
    if (e->todo_tail)
        e->todo_tail->next = j;
    else
        e->todo = j;
    e->todo_tail = j;
    pthread_cond_signal(&e->wake);
    pthread_mutex_unlock(&e->lock);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(collect_doc,
"collect() -> list[int]\n\n"
"The ids of the runs finished since the last call, in submission order;\n"
"their buffers are released.  Call it when `fd` is readable.");

static PyObject *
Encoder_collect(Encoder *e, PyObject *unused)
{
    uint64_t count;
    if (read(e->efd, &count, sizeof count) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    pthread_mutex_lock(&e->lock);
    job *j = e->done;
    e->done = e->done_tail = NULL;
    pthread_mutex_unlock(&e->lock);
    PyObject *ids = PyList_New(0);
    while (j) {
        job *next = j->next;
        PyObject *id = ids ? PyLong_FromLongLong(j->id) : NULL;
        if (id == NULL || PyList_Append(ids, id) < 0)
            Py_CLEAR(ids);
        Py_XDECREF(id);
        release_job(j);
        j = next;
    }
    return ids;
}

PyDoc_STRVAR(close_doc,
"close() -> None\n\n"
"Finish the runs submitted, stop the thread and drop the runs not collected.");

static PyObject *
Encoder_close(Encoder *e, PyObject *unused)
{
    encoder_stop(e);
    Py_RETURN_NONE;
}

static PyObject *
Encoder_fd(Encoder *e, void *closure)
{
    return PyLong_FromLong(e->efd);
}

static PyMethodDef Encoder_methods[] = {
    {"submit", (PyCFunction)Encoder_submit, METH_VARARGS, submit_doc},
    {"collect", (PyCFunction)Encoder_collect, METH_NOARGS, collect_doc},
    {"close", (PyCFunction)Encoder_close, METH_NOARGS, close_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Encoder_getset[] = {
    {"fd", (getter)Encoder_fd, NULL, "eventfd that is readable when runs are done", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nbdcache.tier._pages.Encoder",
    .tp_doc = "encode() on a thread of its own; see the comment in _pages.c",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Encoder_new,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
    .tp_getset = Encoder_getset,
};

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, encode_doc},
    {"encode_page", (PyCFunction)(void (*)(void))encode_page, METH_FASTCALL, encode_page_doc},
    {"decode", decode, METH_VARARGS, decode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nbdcache.tier._pages",
    .m_doc = "The tier's per-page encode and decode loops over whole requests (see _pages.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__pages(void)
{
    if (PyType_Ready(&EncoderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "PAGE_SIZE", PAGE_SIZE) < 0
        || PyModule_AddIntConstant(m, "HOLE", ST_HOLE) < 0
        || PyModule_AddIntConstant(m, "ZERO", ST_ZERO) < 0
        || PyModule_AddIntConstant(m, "SAME", ST_SAME) < 0
        || PyModule_AddIntConstant(m, "RAM", ST_RAM) < 0
        || PyModule_AddIntConstant(m, "DISK", ST_DISK) < 0
        || PyModule_AddIntConstant(m, "HANDLE_SHIFT", HANDLE_SHIFT) < 0
        || PyModule_AddIntConstant(m, "HANDLE_LENGTH_MASK", HANDLE_LENGTH_MASK) < 0
        || PyModule_AddIntConstant(m, "HANDLE_SPLIT", HANDLE_SPLIT) < 0
        || PyModule_AddIntConstant(m, "LZ4_VERSION", LZ4_versionNumber()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
