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
 * and two loops over zsmalloc's tables:
 *
 *   zs_place - its common store path, for a run of encoded pages (see its
 *              comment below);
 *   zs_release - its common free path, for pages written back.
 *
 * Every decision about frames (taking them, giving them back, compaction,
 * the capacity rules) stays in Python; both loops stop where one is needed.
 * The output is the same lz4 block format the lz4 package reads and writes,
 * so pages move freely between this path and the pure-Python one.  The
 * constants below must match nbdcache/tier/__init__.py, arena.py and
 * zsmalloc.py; the Python side checks them at import.
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
 * zs_place: zsmalloc's common write path for a run of encoded pages.
 *
 * Storing a page in RAM is a handful of table updates around one memcpy;
 * stepping through them in Python costs more than compressing the page.
 * zs_place does, for pages first+start, first+start+1, ..., what
 * RamTier._place and _fill do with the Zsmalloc allocator, as long as no
 * frame changes hands:
 *
 *   - a zero or same-filled page: the page table only (a RAM page's old
 *     object is freed first);
 *   - an overwrite that fits the old object's size class: in place;
 *   - any other compressed page: a slot from a partly used zspage of its
 *     class (almost full ones first), then the old object, if any, freed.
 *
 * It stops, leaving the page for Python, at a raw (incompressible) page, at
 * a huge old object and when a free would empty a zspage (its frames go back
 * to the arena).  Python then serves that page as before and calls again
 * for the rest, so there is one write path with a shortcut, not two: the
 * same tables, in the same order, with the same LRU stamps.  It also stops,
 * and says why, where Python must act first and the page is then its own
 * again: a class with no partly used zspage (a new zspage takes frames: the
 * arena's capacity rules, compaction), or no room left for LRU entries (the
 * queue is cleaned before it grows further).  Every index read from the
 * tables is checked before use; a table that fails the check raises
 * ValueError.
 */
#define NIL (-1)
#define ZS_OBJ_HEADER_SIZE 4
#define ZS_HUGE_CLASS 0xFFFF
#define ZS_ALMOST_FULL 1
#define STAMP_MASK 0xFFFFFFFFu

enum {
    T_STATE, T_HANDLES, T_ARENA, T_CLASS_OF, T_CLASS_SIZE, T_CLASS_OBJS, T_CLASS_FULL_AT,
    T_ZS_HEAD, T_ZS_NEXT, T_ZS_CLASS, T_ZS_INUSE, T_ZS_FREEOBJ, T_ZS_FRESH,
    T_LIST_HEAD, T_LIST_PREV, T_LIST_NEXT, T_LIST_OF, T_STAMP, ZS_TABLES
};
static const Py_ssize_t zs_itemsize[ZS_TABLES] = {
    1, 8, 1, 2, 2, 2, 2,
    4, 4, 2, 2, 8, 8,
    4, 4, 4, 2, 4,
};
/* Counters, in and out: the LRU's sequence number; then out only. */
enum { C_SEQ, C_OBJECTS, C_COMPR, C_FRAGMENTED, C_ENTRIES, C_STOP, ZS_COUNTERS };
/* What zs_place_one made of a page, and why the loop stopped (C_STOP). */
enum { ZS_BAD = -1, ZS_PYTHON, ZS_DONE, ZS_NO_ROOM, ZS_NO_ZSPAGE };

typedef struct {
    unsigned char *state;
    uint64_t *handles;
    char *arena;
    const uint16_t *class_of, *class_size, *class_objs, *class_full_at;
    int32_t *zs_head, *zs_next;
    uint16_t *zs_class, *zs_inuse;
    int64_t *zs_freeobj, *zs_fresh;
    int32_t *list_head, *list_prev, *list_next;
    int16_t *list_of;
    uint32_t *stamp;
    Py_ssize_t pages, arena_len, frames, classes, lists;
    uint32_t seq;
    int64_t objects, compr;
    int fragmented;
} zs;

static int
zs_frame_ok(const zs *z, int64_t frame)
{
    return frame >= 0 && frame < z->frames;
}

/* A slot start inside the arena, with room for its header and free link. */
static int
zs_slot_ok(const zs *z, int64_t start)
{
    return start >= 0 && start % 16 == 0 && start <= z->arena_len - 16;
}

static void
zs_list_remove(zs *z, int32_t frame)
{
    int16_t lst = z->list_of[frame];
    if (lst < 0)
        return;
    int32_t prev = z->list_prev[frame], nxt = z->list_next[frame];
    if (prev == NIL)
        z->list_head[lst] = nxt;
    else
        z->list_next[prev] = nxt;
    if (nxt != NIL)
        z->list_prev[nxt] = prev;
    z->list_of[frame] = NIL;
}

static void
zs_list_push(zs *z, int lst, int32_t frame)
{
    int32_t first = z->list_head[lst];
    z->list_prev[frame] = NIL;
    z->list_next[frame] = first;
    if (first != NIL)
        z->list_prev[first] = frame;
    z->list_head[lst] = frame;
    z->list_of[frame] = (int16_t)lst;
}

/* The list links of the frames touched are checked by zs_links_ok first. */
static int
zs_links_ok(const zs *z, int32_t frame)
{
    int16_t lst = z->list_of[frame];
    if (lst < 0)
        return lst == NIL;
    int32_t prev = z->list_prev[frame], nxt = z->list_next[frame];
    return lst < z->lists && (prev == NIL || zs_frame_ok(z, prev))
           && (nxt == NIL || zs_frame_ok(z, nxt));
}

/* Whether both fullness lists of class `cls` start at NIL or at a frame. */
static int
zs_heads_ok(const zs *z, int cls)
{
    int32_t a = z->list_head[cls << 1], b = z->list_head[(cls << 1) | ZS_ALMOST_FULL];
    return (a == NIL || zs_frame_ok(z, a)) && (b == NIL || zs_frame_ok(z, b));
}

/* The zspage to allocate from in class `cls`, or NIL (-2 if a table is bad). */
static int32_t
zs_pick(const zs *z, int cls)
{
    if (!zs_heads_ok(z, cls))
        return -2;
    int32_t head = z->list_head[(cls << 1) | ZS_ALMOST_FULL];
    if (head == NIL)
        head = z->list_head[cls << 1];
    if (head == NIL)
        return NIL;
    if (!zs_links_ok(z, head) || z->zs_class[head] != cls)
        return -2;
    return head;
}

/* The slot zs_take would give from zspage `head`, checked; -1 if a table is bad. */
static int64_t
zs_peek(const zs *z, int32_t head)
{
    int64_t start = z->zs_freeobj[head];
    if (start != NIL) {
        int64_t link = zs_slot_ok(z, start) ? ((int64_t *)z->arena)[start >> 3] : -2;
        return link == NIL || zs_slot_ok(z, link) ? start : -1;
    }
    start = z->zs_fresh[head];
    return zs_slot_ok(z, start) ? start : -1;
}

/* Take slot `start` (from zs_peek) of zspage `head`, class `cls`, for `pgno`. */
static void
zs_take(zs *z, int32_t head, int cls, int64_t start, uint32_t pgno)
{
    if (z->zs_freeobj[head] == start) {
        z->zs_freeobj[head] = ((int64_t *)z->arena)[start >> 3];
    } else {
        int64_t end = (start % PAGE_SIZE) + z->class_size[cls];
        if (end < PAGE_SIZE) {
            z->zs_fresh[head] = start + z->class_size[cls];
        } else {
            int64_t nxt = z->zs_next[start / PAGE_SIZE];
            z->zs_fresh[head] = nxt * PAGE_SIZE + end - PAGE_SIZE;
        }
    }
    int inuse = ++z->zs_inuse[head];
    int lst = cls << 1;
    if (inuse == z->class_objs[cls]) {
        zs_list_remove(z, head); /* full: on no list */
    } else if (inuse == z->class_full_at[cls]) {
        zs_list_remove(z, head);
        zs_list_push(z, lst | ZS_ALMOST_FULL, head);
    }
    ((uint32_t *)z->arena)[start >> 2] = pgno;
    z->objects++;
}

/* Whether zs_free can free `handle` here: a live slot whose zspage keeps
 * another object.  Returns its zspage, NIL if not, -2 if a table is bad. */
static int32_t
zs_freeable(const zs *z, uint64_t handle)
{
    if ((handle & HANDLE_LENGTH_MASK) == PAGE_SIZE)
        return NIL; /* a huge frame goes back to the arena */
    int64_t start = (int64_t)(handle >> HANDLE_SHIFT) - ZS_OBJ_HEADER_SIZE;
    if (!zs_slot_ok(z, start))
        return -2;
    int32_t head = z->zs_head[start / PAGE_SIZE];
    if (!zs_frame_ok(z, head) || !zs_links_ok(z, head))
        return -2;
    int cls = z->zs_class[head];
    if (cls >= z->classes || z->zs_inuse[head] == 0 || !zs_heads_ok(z, cls))
        return -2;
    return z->zs_inuse[head] > 1 ? head : NIL;
}

static void
zs_free(zs *z, uint64_t handle, int32_t head)
{
    int64_t start = (int64_t)(handle >> HANDLE_SHIFT) - ZS_OBJ_HEADER_SIZE;
    ((int64_t *)z->arena)[start >> 3] = z->zs_freeobj[head];
    z->zs_freeobj[head] = start;
    int inuse = --z->zs_inuse[head];
    int cls = z->zs_class[head];
    int objs = z->class_objs[cls], full_at = z->class_full_at[cls];
    if (inuse == objs - 1)
        z->fragmented = 1;
    if (inuse == objs - 1 || inuse == full_at - 1) { /* refile */
        zs_list_remove(z, head);
        zs_list_push(z, (cls << 1) | (inuse >= full_at ? ZS_ALMOST_FULL : 0), head);
    }
    z->objects--;
}

/* The handle of a payload, split if it runs into a frame not next in the arena. */
static uint64_t
zs_handle(const zs *z, int64_t addr, int size)
{
    uint64_t handle = (uint64_t)addr << HANDLE_SHIFT | (uint64_t)size;
    if ((addr % PAGE_SIZE) + size > PAGE_SIZE && z->zs_next[addr / PAGE_SIZE] != addr / PAGE_SIZE + 1)
        handle |= HANDLE_SPLIT;
    return handle;
}

/* Whether a payload of `size` bytes fits where `handle` says, in the arena. */
static int
zs_write_ok(const zs *z, uint64_t handle, int size)
{
    int64_t addr = (int64_t)(handle >> HANDLE_SHIFT);
    if (!(handle & HANDLE_SPLIT))
        return addr <= z->arena_len - size;
    int64_t cut = PAGE_SIZE - (addr % PAGE_SIZE);
    int64_t more = z->zs_next[addr / PAGE_SIZE];
    return zs_frame_ok(z, more) && more * PAGE_SIZE <= z->arena_len - (size - cut);
}

/* Copy a payload to where its handle says (checked by zs_write_ok). */
static void
zs_write(zs *z, uint64_t handle, const char *obj, int size)
{
    int64_t addr = (int64_t)(handle >> HANDLE_SHIFT);
    if (!(handle & HANDLE_SPLIT)) {
        memcpy(z->arena + addr, obj, size);
        return;
    }
    int64_t cut = PAGE_SIZE - (addr % PAGE_SIZE);
    int64_t more = z->zs_next[addr / PAGE_SIZE];
    memcpy(z->arena + addr, obj, cut);
    memcpy(z->arena + more * PAGE_SIZE, obj + cut, size - cut);
}

/* One page: ZS_DONE, ZS_PYTHON to leave it to Python, ZS_NO_ROOM if it
 * would be done but there is no `room` for its LRU entry, ZS_NO_ZSPAGE if
 * its class needs a new zspage first, ZS_BAD if a table is bad.  Every check
 * comes before the first change, so a bad table changes nothing. */
static int
zs_place_one(zs *z, uint32_t pgno, int size, uint64_t word, const char *obj, int room,
             uint64_t *entry)
{
    unsigned char old_state = z->state[pgno];
    uint64_t old = z->handles[pgno];
    int old_size = (int)(old & HANDLE_LENGTH_MASK);
    int32_t old_head = NIL;
    if (old_state == ST_RAM) {
        if (old_size == 0 || old_size > PAGE_SIZE
            || (old_size < PAGE_SIZE
                && !zs_slot_ok(z, (int64_t)(old >> HANDLE_SHIFT) - ZS_OBJ_HEADER_SIZE)))
            return ZS_BAD;
        if (old_size == PAGE_SIZE)
            return ZS_PYTHON; /* a huge frame goes back to the arena */
    }
    if (size < 0) {
        if (old_state == ST_RAM) {
            if ((old_head = zs_freeable(z, old)) < 0)
                return old_head == NIL ? ZS_PYTHON : ZS_BAD;
            zs_free(z, old, old_head);
            z->compr -= old_size;
        }
        z->handles[pgno] = word;
        z->state[pgno] = word ? ST_SAME : ST_ZERO;
        return ZS_DONE;
    }
    if (size == 0 || size >= PAGE_SIZE)
        return ZS_PYTHON; /* raw: Python counts it and may send it to the image */
    int cls = z->class_of[size];
    if (cls >= z->classes)
        return ZS_BAD;
    uint64_t handle;
    if (old_state == ST_RAM && z->class_of[old_size] == cls) { /* realloc in place */
        handle = zs_handle(z, (int64_t)(old >> HANDLE_SHIFT), size);
        if (!zs_write_ok(z, handle, size))
            return ZS_BAD;
        if (!room)
            return ZS_NO_ROOM;
    } else {
        if (old_state == ST_RAM && (old_head = zs_freeable(z, old)) < 0)
            return old_head == NIL ? ZS_PYTHON : ZS_BAD;
        int32_t head = zs_pick(z, cls);
        if (head < 0)
            return head == NIL ? ZS_NO_ZSPAGE : ZS_BAD;
        int64_t start = zs_peek(z, head);
        if (start < 0)
            return ZS_BAD;
        handle = zs_handle(z, start + ZS_OBJ_HEADER_SIZE, size);
        if (!zs_write_ok(z, handle, size))
            return ZS_BAD;
        if (!room)
            return ZS_NO_ROOM;
        zs_take(z, head, cls, start, pgno);
    }
    zs_write(z, handle, obj, size);
    z->seq = (z->seq + 1) & STAMP_MASK;
    z->stamp[pgno] = z->seq;
    *entry = (uint64_t)pgno << 32 | z->seq;
    z->handles[pgno] = handle;
    if (old_state == ST_RAM) {
        z->compr += size - old_size;
        if (old_head >= 0)
            zs_free(z, old, old_head); /* after the page points at its new copy */
    } else {
        z->state[pgno] = ST_RAM;
        z->compr += size;
    }
    return ZS_DONE;
}

PyDoc_STRVAR(zs_place_doc,
"zs_place(tables, counters, first, start, count, out, sizes, words, entries) -> int\n\n"
"Store pages first+start, ... first+count-1 of a run `encode` left in\n"
"(out, sizes, words) through zsmalloc's tables, until a page needs Python\n"
"(see the comment in _pages.c); returns the index of that page, or count.\n"
"`tables` is the tuple of buffers Zsmalloc.place_run passes; `counters`\n"
"(int64) holds the LRU sequence number in and out, then the change in live\n"
"objects, the change in payload bytes, whether a full zspage lost an\n"
"object, how many LRU entries were written to `entries` (uint64), and\n"
"why it stopped: 0 for the end or a page for Python, 2 for want of room\n"
"in `entries`, 3 for want of a zspage of the page's class.");

/* Take buffers of zsmalloc's tables (the tuple Zsmalloc passes) into `z`.
 * Returns how many of `t` are held (ZS_TABLES), or -1 with an exception
 * set, nothing then held. */
static int
zs_open(PyObject *tables, Py_buffer t[ZS_TABLES], zs *z)
{
    if (!PyTuple_Check(tables) || PyTuple_GET_SIZE(tables) != ZS_TABLES) {
        PyErr_SetString(PyExc_TypeError, "needs the tuple of zsmalloc's tables");
        return -1;
    }
    int held = 0;
    for (; held < ZS_TABLES; held++) {
        int flags = held == T_CLASS_OF || held == T_CLASS_SIZE || held == T_CLASS_OBJS
                            || held == T_CLASS_FULL_AT
                        ? PyBUF_SIMPLE
                        : PyBUF_WRITABLE;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(tables, held), &t[held], flags) < 0)
            goto fail;
        if (t[held].itemsize != zs_itemsize[held]) {
            PyErr_Format(PyExc_ValueError, "zsmalloc table %d has items of the wrong size", held);
            held++;
            goto fail;
        }
    }
    *z = (zs){
        .state = t[T_STATE].buf,
        .handles = t[T_HANDLES].buf,
        .arena = t[T_ARENA].buf,
        .class_of = t[T_CLASS_OF].buf,
        .class_size = t[T_CLASS_SIZE].buf,
        .class_objs = t[T_CLASS_OBJS].buf,
        .class_full_at = t[T_CLASS_FULL_AT].buf,
        .zs_head = t[T_ZS_HEAD].buf,
        .zs_next = t[T_ZS_NEXT].buf,
        .zs_class = t[T_ZS_CLASS].buf,
        .zs_inuse = t[T_ZS_INUSE].buf,
        .zs_freeobj = t[T_ZS_FREEOBJ].buf,
        .zs_fresh = t[T_ZS_FRESH].buf,
        .list_head = t[T_LIST_HEAD].buf,
        .list_prev = t[T_LIST_PREV].buf,
        .list_next = t[T_LIST_NEXT].buf,
        .list_of = t[T_LIST_OF].buf,
        .stamp = t[T_STAMP].buf,
        .pages = t[T_STATE].len,
        .arena_len = t[T_ARENA].len,
        .frames = t[T_ARENA].len / PAGE_SIZE,
        .classes = t[T_CLASS_SIZE].len / 2,
        .lists = t[T_LIST_HEAD].len / 4,
    };
    /* Compared by subtraction and division: no sum or product can overflow. */
    if (z->pages > (Py_ssize_t)STAMP_MASK + 1 || t[T_HANDLES].len / 8 != z->pages
        || t[T_STAMP].len / 4 != z->pages || t[T_CLASS_OF].len / 2 != PAGE_SIZE + 1
        || t[T_CLASS_OBJS].len / 2 != z->classes || t[T_CLASS_FULL_AT].len / 2 != z->classes
        || z->lists != 2 * z->classes
        || t[T_ZS_HEAD].len / 4 != z->frames || t[T_ZS_NEXT].len / 4 != z->frames
        || t[T_ZS_CLASS].len / 2 != z->frames || t[T_ZS_INUSE].len / 2 != z->frames
        || t[T_ZS_FREEOBJ].len / 8 != z->frames || t[T_ZS_FRESH].len / 8 != z->frames
        || t[T_LIST_PREV].len / 4 != z->frames || t[T_LIST_NEXT].len / 4 != z->frames
        || t[T_LIST_OF].len / 2 != z->frames) {
        PyErr_SetString(PyExc_ValueError, "zsmalloc's tables do not match each other");
        goto fail;
    }
    return held;
fail:
    for (int k = 0; k < held; k++)
        PyBuffer_Release(&t[k]);
    return -1;
}

static void
zs_close(Py_buffer t[ZS_TABLES])
{
    for (int k = 0; k < ZS_TABLES; k++)
        PyBuffer_Release(&t[k]);
}

/* Buffers of objs[k] (with flags[k]) into *bufs[k], all or none: -1 with an
 * exception set, nothing then held. */
static int
take_buffers(int n, PyObject *const objs[], const int flags[], Py_buffer *const bufs[])
{
    for (int k = 0; k < n; k++) {
        if (PyObject_GetBuffer(objs[k], bufs[k], flags[k]) < 0) {
            while (k--)
                PyBuffer_Release(bufs[k]);
            return -1;
        }
    }
    return 0;
}

static void
release_buffers(int n, Py_buffer *const bufs[])
{
    for (int k = 0; k < n; k++)
        PyBuffer_Release(bufs[k]);
}

static PyObject *
zs_place(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "zs_place() takes 9 arguments");
        return NULL;
    }
    Py_ssize_t first = PyLong_AsSsize_t(args[2]);
    Py_ssize_t start = PyLong_AsSsize_t(args[3]);
    Py_ssize_t count = PyLong_AsSsize_t(args[4]);
    if ((first == -1 || start == -1 || count == -1) && PyErr_Occurred())
        return NULL;
    Py_buffer t[ZS_TABLES], counters, out, sizes, words, entries;
    Py_buffer *const more[] = {&counters, &out, &sizes, &words, &entries};
    PyObject *const objs[] = {args[1], args[5], args[6], args[7], args[8]};
    static const int flags[] = {PyBUF_WRITABLE, PyBUF_SIMPLE, PyBUF_SIMPLE, PyBUF_SIMPLE,
                                PyBUF_WRITABLE};
    zs z;
    if (zs_open(args[0], t, &z) < 0)
        return NULL;
    if (take_buffers(5, objs, flags, more) < 0) {
        zs_close(t);
        return NULL;
    }
    PyObject *result = NULL;
    if (counters.len != ZS_COUNTERS * 8 || counters.itemsize != 8 || sizes.itemsize != 4
        || words.itemsize != 8 || entries.itemsize != 8 || first < 0 || start < 0
        || count < start || first > z.pages || count > z.pages - first
        || count > sizes.len / 4 || count > words.len / 8 || count > out.len / PAGE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "zs_place(): bad counters, run or output buffers");
        goto end;
    }
    int64_t *c = counters.buf;
    const int32_t *sz = sizes.buf;
    const uint64_t *w = words.buf;
    uint64_t *e = entries.buf;
    Py_ssize_t room = entries.len / 8, n = 0, i = start;
    int r = ZS_PYTHON;
    z.seq = (uint32_t)c[C_SEQ];
    for (; i < count; i++) {
        const char *obj = (const char *)out.buf + i * PAGE_SIZE;
        r = zs_place_one(&z, (uint32_t)(first + i), sz[i], w[i], obj, n < room, e + n);
        if (r != ZS_DONE)
            break;
        n += sz[i] >= 0;
    }
    if (r == ZS_BAD)
        PyErr_Format(PyExc_ValueError, "zsmalloc's tables are inconsistent at page %zd", first + i);
    /* What was done stays done: report it even when raising. */
    c[C_SEQ] = z.seq;
    c[C_OBJECTS] = z.objects;
    c[C_COMPR] = z.compr;
    c[C_FRAGMENTED] = z.fragmented;
    c[C_ENTRIES] = n;
    c[C_STOP] = i < count && r != ZS_BAD ? r : ZS_PYTHON;
    if (!PyErr_Occurred())
        result = PyLong_FromSsize_t(i);
end:
    release_buffers(5, more);
    zs_close(t);
    return result;
}

PyDoc_STRVAR(zs_release_doc,
"zs_release(tables, counters, pages, start) -> int\n\n"
"Release the RAM copies of pages[start], pages[start+1], ... (uint32 page\n"
"numbers) that the backing image now holds: free each object and make the\n"
"page DISK, until a page needs Python (not RAM, a huge object, or a free\n"
"that would empty its zspage); returns the index of that page, or\n"
"len(pages).  `counters` is zs_place's: the change in live objects, in\n"
"payload bytes and whether a full zspage lost an object come out.");

static PyObject *
zs_release(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "zs_release() takes 4 arguments");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[3]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer t[ZS_TABLES], counters, pages;
    Py_buffer *const more[] = {&counters, &pages};
    PyObject *const objs[] = {args[1], args[2]};
    static const int flags[] = {PyBUF_WRITABLE, PyBUF_SIMPLE};
    zs z;
    if (zs_open(args[0], t, &z) < 0)
        return NULL;
    if (take_buffers(2, objs, flags, more) < 0) {
        zs_close(t);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t count = pages.len / 4;
    if (counters.len != ZS_COUNTERS * 8 || counters.itemsize != 8 || pages.itemsize != 4
        || start < 0 || start > count) {
        PyErr_SetString(PyExc_ValueError, "zs_release(): bad counters or pages");
        goto end;
    }
    const uint32_t *pg = pages.buf;
    Py_ssize_t i = start;
    int bad = 0;
    for (; i < count; i++) {
        uint32_t pgno = pg[i];
        if (pgno >= z.pages || z.state[pgno] != ST_RAM)
            break;
        uint64_t handle = z.handles[pgno];
        int size = (int)(handle & HANDLE_LENGTH_MASK);
        if (size == 0 || size > PAGE_SIZE) {
            bad = 1;
            break;
        }
        int32_t head = zs_freeable(&z, handle);
        if (head < 0) {
            bad = head != NIL;
            break;
        }
        zs_free(&z, handle, head);
        z.compr -= size;
        z.handles[pgno] = 0;
        z.state[pgno] = ST_DISK;
    }
    if (bad)
        PyErr_Format(PyExc_ValueError, "zsmalloc's tables are inconsistent at page %u", pg[i]);
    int64_t *c = counters.buf;
    c[C_OBJECTS] = z.objects;
    c[C_COMPR] = z.compr;
    c[C_FRAGMENTED] = z.fragmented;
    if (!PyErr_Occurred())
        result = PyLong_FromSsize_t(i);
end:
    release_buffers(2, more);
    zs_close(t);
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
    {"zs_place", (PyCFunction)(void (*)(void))zs_place, METH_FASTCALL, zs_place_doc},
    {"zs_release", (PyCFunction)(void (*)(void))zs_release, METH_FASTCALL, zs_release_doc},
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
        || PyModule_AddIntConstant(m, "ZS_OBJ_HEADER_SIZE", ZS_OBJ_HEADER_SIZE) < 0
        || PyModule_AddIntConstant(m, "ZS_HUGE_CLASS", ZS_HUGE_CLASS) < 0
        || PyModule_AddIntConstant(m, "ZS_NO_ROOM", ZS_NO_ROOM) < 0
        || PyModule_AddIntConstant(m, "ZS_NO_ZSPAGE", ZS_NO_ZSPAGE) < 0
        || PyModule_AddIntConstant(m, "LZ4_VERSION", LZ4_versionNumber()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
