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
 *             lz4 pages that lie in one piece).
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
    if (src.len % PAGE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "source is not a whole number of pages");
    } else if (threshold <= 0 || threshold >= PAGE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "threshold must be in 1..4095");
    } else if (out.len < n * PAGE_SIZE || sizes.len < n * 4 || words.len < n * 8
               || sizes.itemsize != 4 || words.itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "output buffers are too small or of the wrong type");
    } else {
        const unsigned char *s = src.buf;
        char *o = out.buf;
        int32_t *sz = sizes.buf;
        uint64_t *w = words.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            const unsigned char *page = s + i * PAGE_SIZE;
            if (filled(page, &w[i])) {
                sz[i] = -1;
                continue;
            }
            int c = LZ4_compress_default((const char *)page, o + i * PAGE_SIZE, PAGE_SIZE,
                                         threshold);
            sz[i] = c > 0 ? c : PAGE_SIZE;
        }
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    PyBuffer_Release(&sizes);
    PyBuffer_Release(&words);
    return result;
}

PyDoc_STRVAR(decode_doc,
"decode(state, handles, arena, first, count, out) -> int\n\n"
"Expand pages first, first+1, ... into out[0:], out[4096:], ... and stop at\n"
"the first page this path does not serve (DISK, or an object split across\n"
"frames) or after `count`; returns how many pages were written.  `state`\n"
"is the page table's state bytes, `handles` its uint64 handles.  Raises\n"
"ValueError if an lz4 block in the arena does not expand to a page.");

static PyObject *
decode(PyObject *self, PyObject *args)
{
    Py_buffer state, handles, arena, out;
    Py_ssize_t first, count;
    if (!PyArg_ParseTuple(args, "y*y*y*nnw*", &state, &handles, &arena, &first, &count, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t done = 0, bad = -1;
    if (first < 0 || count < 0 || first + count > state.len
        || (first + count) * 8 > handles.len || count * PAGE_SIZE > out.len
        || handles.itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "page range outside the table or the output");
        goto end;
    }
    const unsigned char *st = state.buf;
    const uint64_t *h = handles.buf;
    const char *a = arena.buf;
    char *o = out.buf;
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
            if (handle & HANDLE_SPLIT)
                break;
            Py_ssize_t size = (Py_ssize_t)(handle & HANDLE_LENGTH_MASK);
            Py_ssize_t addr = (Py_ssize_t)(handle >> HANDLE_SHIFT);
            if (addr + size > arena.len) {
                bad = pgno;
                break;
            }
            if (size == PAGE_SIZE) {
                memcpy(dst, a + addr, PAGE_SIZE);
            } else if (LZ4_decompress_safe(a + addr, dst, (int)size, PAGE_SIZE) != PAGE_SIZE) {
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
    return result;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, encode_doc},
    {"decode", decode, METH_VARARGS, decode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "nbdcache.tier._pages",
    "The tier's per-page encode and decode loops over whole requests (see _pages.c).", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__pages(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
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
