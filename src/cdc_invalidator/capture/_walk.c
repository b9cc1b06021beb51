/* The compiled tuple walks of capture/pgoutput.py, in C: same contract, less time.
 *
 * A Walker is made per Relation message, for its column count and the wanted columns
 * (index, name), in column order. Called as walker(msg, pos), it walks the pgoutput
 * TupleData at `pos` of `msg` (bytes) and returns what pgoutput.py's _compile_walk and
 * _compile_pair walks return:
 *   walk: ({name: text or None}, end)
 *   pair: (old, new, end) for an UPDATE's old tuple at `pos`, then 'N' and the new one;
 *         new is old (one dict) when the wanted columns' bytes are the same.
 * walker.collect(msg, pos, old, new, keyed) walks a whole streamed change instead and
 * appends its wanted values column-wise, one list per column (capture/packs.py): a bulk
 * statement's million changes without a dict or an event each. A Gatherer runs that for
 * each message of a stream block, the per-message loop of capture/packs.py.
 * Anything else, a message that ends early included, gives None: the general walk in
 * Python then decodes the message and names what is wrong. So every read here is
 * bounds-checked against the message's length, and nothing here raises but MemoryError.
 *
 * What a walk takes: text ('t') and NULL ('n') in every column, and an unchanged TOASTed
 * value ('u') in a column not wanted; values that are UTF-8 (decoded strictly, as
 * bytes.decode() does). A wanted 'u', a binary value ('b'), another column count, bytes
 * that are not UTF-8: None.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Py_ssize_t ncols;
    Py_ssize_t nwanted;
    int pair;
    PyObject **names;    /* the wanted columns' names (str), owned, in column order */
    char *wanted;        /* ncols flags: 1 for a wanted column */
} Walker;

/* A wanted column's raw value: its bytes in the message (NULL for SQL NULL). */
typedef struct {
    const char *at;
    Py_ssize_t len;
} Raw;

static uint32_t
read_u32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Walk one TupleData at *pos; the wanted columns' raw values into raw[0..nwanted).
 * 1 when walked (then *pos is after it), 0 for anything a compiled walk does not take. */
static int
walk_tuple(const Walker *w, const unsigned char *msg, Py_ssize_t size, Py_ssize_t *pos, Raw *raw)
{
    Py_ssize_t p = *pos, i, n = 0;
    if (p < 0 || size - p < 2) {
        return 0;
    }
    if (((Py_ssize_t)msg[p] << 8 | msg[p + 1]) != w->ncols) {
        return 0;
    }
    p += 2;
    for (i = 0; i < w->ncols; i++) {
        unsigned char kind;
        if (p >= size) {
            return 0;
        }
        kind = msg[p];
        if (kind == 't') {
            uint32_t len;
            if (size - p < 5) {
                return 0;
            }
            len = read_u32(msg + p + 1);
            if ((uint64_t)len > (uint64_t)(size - p - 5)) {
                return 0;
            }
            if (w->wanted[i]) {
                raw[n].at = (const char *)msg + p + 5;
                raw[n].len = (Py_ssize_t)len;
                n++;
            }
            p += 5 + (Py_ssize_t)len;
        }
        else if (kind == 'n') {
            if (w->wanted[i]) {
                raw[n].at = NULL;
                raw[n].len = 0;
                n++;
            }
            p += 1;
        }
        else if (kind == 'u' && !w->wanted[i]) {
            p += 1;
        }
        else {
            return 0;
        }
    }
    *pos = p;
    return 1;
}

/* The wanted columns' values as a dict; NULL with no error set for a value that is not
 * UTF-8, NULL with an error set for MemoryError. */
static PyObject *
row_dict(const Walker *w, const Raw *raw)
{
    Py_ssize_t i;
    PyObject *row = PyDict_New();
    if (row == NULL) {
        return NULL;
    }
    for (i = 0; i < w->nwanted; i++) {
        PyObject *value;
        int failed;
        if (raw[i].at == NULL) {
            value = Py_NewRef(Py_None);
        }
        else {
            value = PyUnicode_DecodeUTF8(raw[i].at, raw[i].len, NULL);
            if (value == NULL) {
                Py_DECREF(row);
                if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                    PyErr_Clear();
                }
                return NULL;
            }
        }
        failed = PyDict_SetItem(row, w->names[i], value);
        Py_DECREF(value);
        if (failed) {
            Py_DECREF(row);
            return NULL;
        }
    }
    return row;
}

static int
same_raw(const Raw *a, const Raw *b, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        if ((a[i].at == NULL) != (b[i].at == NULL)) {
            return 0;
        }
        if (a[i].at != NULL
            && (a[i].len != b[i].len || memcmp(a[i].at, b[i].at, (size_t)a[i].len) != 0)) {
            return 0;
        }
    }
    return 1;
}

#define SMALL 16 /* wanted columns walked without an allocation */

static PyObject *
walker_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Walker *w = (Walker *)self;
    Py_ssize_t size, pos;
    const unsigned char *msg;
    Raw small[2 * SMALL];
    Raw *old, *new;
    PyObject *result = NULL, *new_row = NULL, *old_row = NULL;

    if (PyVectorcall_NARGS(nargsf) != 2 || kwnames != NULL || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "a walker takes (msg: bytes, pos: int)");
        return NULL;
    }
    pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    msg = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    size = PyBytes_GET_SIZE(args[0]);
    if (w->nwanted <= SMALL) {
        old = small;
    }
    else {
        old = PyMem_New(Raw, 2 * w->nwanted);
        if (old == NULL) {
            return PyErr_NoMemory();
        }
    }
    new = old + w->nwanted;

    if (!w->pair) {
        if (!walk_tuple(w, msg, size, &pos, old)) {
            goto miss;
        }
        new_row = row_dict(w, old);
        if (new_row == NULL) {
            goto fail_or_miss;
        }
        result = Py_BuildValue("(Nn)", new_row, pos);
        goto done;
    }
    if (!walk_tuple(w, msg, size, &pos, old) || pos >= size || msg[pos] != 'N') {
        goto miss;
    }
    pos += 1;
    if (!walk_tuple(w, msg, size, &pos, new)) {
        goto miss;
    }
    new_row = row_dict(w, new);
    if (new_row == NULL) {
        goto fail_or_miss;
    }
    if (same_raw(old, new, w->nwanted)) {
        result = Py_BuildValue("(OOn)", new_row, new_row, pos);
        Py_DECREF(new_row);
        goto done;
    }
    old_row = row_dict(w, old);
    if (old_row == NULL) {
        Py_DECREF(new_row);
        goto fail_or_miss;
    }
    result = Py_BuildValue("(NNn)", old_row, new_row, pos);
    goto done;

fail_or_miss:
    if (PyErr_Occurred()) {
        goto done; /* MemoryError: result stays NULL */
    }
miss:
    result = Py_NewRef(Py_None);
done:
    if (old != small) {
        PyMem_Free(old);
    }
    return result;
}

/* The wanted columns' values (new references) into out[0..nwanted); 0 for a value that
 * is not UTF-8 (nothing left to release), -1 for MemoryError. */
static int
decode_values(const Walker *w, const Raw *raw, PyObject **out)
{
    Py_ssize_t i;
    for (i = 0; i < w->nwanted; i++) {
        if (raw[i].at == NULL) {
            out[i] = Py_NewRef(Py_None);
            continue;
        }
        out[i] = PyUnicode_DecodeUTF8(raw[i].at, raw[i].len, NULL);
        if (out[i] == NULL) {
            while (i-- > 0) {
                Py_DECREF(out[i]);
            }
            if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                PyErr_Clear();
                return 0;
            }
            return -1;
        }
    }
    return 1;
}

/* A side given to collect(): None, or a tuple of nwanted lists. */
static int
side_ok(const Walker *w, PyObject *side)
{
    Py_ssize_t i;
    if (side == Py_None) {
        return 1;
    }
    if (!PyTuple_CheckExact(side) || PyTuple_GET_SIZE(side) != w->nwanted) {
        return 0;
    }
    for (i = 0; i < w->nwanted; i++) {
        if (!PyList_CheckExact(PyTuple_GET_ITEM(side, i))) {
            return 0;
        }
    }
    return 1;
}

/* Append values[i] to the i-th list of `side`; on MemoryError, what was appended is taken
 * back, so that the lists keep one length. */
static int
append_values(const Walker *w, PyObject *side, PyObject **values)
{
    Py_ssize_t i, j;
    for (i = 0; i < w->nwanted; i++) {
        if (PyList_Append(PyTuple_GET_ITEM(side, i), values[i]) < 0) {
            for (j = 0; j < i; j++) {
                PyObject *list = PyTuple_GET_ITEM(side, j);
                Py_ssize_t n = PyList_GET_SIZE(list);
                (void)PyList_SetSlice(list, n - 1, n, NULL);
            }
            return -1;
        }
    }
    return 1;
}

static void
release_values(const Walker *w, PyObject **values)
{
    Py_ssize_t i;
    for (i = 0; i < w->nwanted; i++) {
        Py_DECREF(values[i]);
    }
}

/* collect_into(w, msg, size, pos, old, new, keyed), as walker.collect(msg, pos, old, new,
 * keyed): a whole INSERT, UPDATE or DELETE message
 * (its type byte msg[0]; `pos` the offset of its first tuple's tag) walked, and the
 * wanted columns' values appended column-wise: to the lists of `old` (the old row) and of
 * `new` (the new row), each a tuple of one list per wanted column, in column order.
 * `keyed`: a 'K' (replica identity) old tuple holds every wanted column.
 *
 * Returns 0 when it does not take the message (as the walks above: anything not text or
 * NULL in a wanted column, bytes not UTF-8, a tuple that is not the message's end, a
 * side missing): then nothing was appended, and the caller decodes the message the
 * general way. Else: 1 INSERT or DELETE, or an UPDATE whose wanted columns' bytes are the
 * same in both tuples (the same str objects appended to both sides); 2 an UPDATE whose
 * differ; 3 an UPDATE without an old tuple (its new values appended to both sides). */
static int
collect_into(const Walker *w, const unsigned char *msg, Py_ssize_t size, Py_ssize_t pos,
             PyObject *old_side, PyObject *new_side, int keyed)
{
    Raw small[2 * SMALL];
    PyObject *small_values[2 * SMALL];
    Raw *old_raw = small, *new_raw;
    PyObject **old_values = small_values, **new_values;
    int taken = 0, walked, decoded;
    unsigned char kind, tag;

    if (size < 1 || pos < 1 || pos >= size) {
        return 0;
    }
    if (w->nwanted > SMALL) {
        old_raw = PyMem_New(Raw, 2 * w->nwanted);
        old_values = PyMem_New(PyObject *, 2 * w->nwanted);
        if (old_raw == NULL || old_values == NULL) {
            PyMem_Free(old_raw);
            PyMem_Free(old_values);
            PyErr_NoMemory();
            return -1;
        }
    }
    new_raw = old_raw + w->nwanted;
    new_values = old_values + w->nwanted;
    kind = msg[0];
    tag = msg[pos];

    if (kind == 'I' || kind == 'D') {
        /* one tuple: an INSERT's new ('N'), a DELETE's old ('O', or 'K' when keyed) */
        PyObject *side = kind == 'I' ? new_side : old_side;
        int tag_ok = kind == 'I' ? tag == 'N' : (tag == 'O' || (tag == 'K' && keyed));
        if (side == Py_None || !tag_ok) {
            goto done;
        }
        pos += 1;
        if (!walk_tuple(w, msg, size, &pos, new_raw) || pos != size) {
            goto done;
        }
        decoded = decode_values(w, new_raw, new_values);
        if (decoded <= 0) {
            taken = decoded;
            goto done;
        }
        taken = append_values(w, side, new_values);
        release_values(w, new_values);
    }
    else if (kind == 'U') {
        int same = 1, no_old = (tag == 'N');
        if (old_side == Py_None || new_side == Py_None) {
            goto done;
        }
        if (!no_old) {
            if (!(tag == 'O' || (tag == 'K' && keyed))) {
                goto done;
            }
            pos += 1;
            walked = walk_tuple(w, msg, size, &pos, old_raw);
            if (!walked || pos >= size || msg[pos] != 'N') {
                goto done;
            }
        }
        pos += 1;
        if (!walk_tuple(w, msg, size, &pos, new_raw) || pos != size) {
            goto done;
        }
        if (!no_old) {
            same = same_raw(old_raw, new_raw, w->nwanted);
        }
        decoded = decode_values(w, new_raw, new_values);
        if (decoded <= 0) {
            taken = decoded;
            goto done;
        }
        if (!same) {
            decoded = decode_values(w, old_raw, old_values);
            if (decoded <= 0) {
                release_values(w, new_values);
                taken = decoded;
                goto done;
            }
        }
        taken = append_values(w, old_side, same ? new_values : old_values);
        if (taken > 0) {
            taken = append_values(w, new_side, new_values);
            if (taken < 0) {
                /* take the old side's values back too: both sides keep one length */
                Py_ssize_t i;
                for (i = 0; i < w->nwanted; i++) {
                    PyObject *list = PyTuple_GET_ITEM(old_side, i);
                    Py_ssize_t n = PyList_GET_SIZE(list);
                    (void)PyList_SetSlice(list, n - 1, n, NULL);
                }
            }
        }
        release_values(w, new_values);
        if (!same) {
            release_values(w, old_values);
        }
        if (taken > 0) {
            taken = no_old ? 3 : (same ? 1 : 2);
        }
    }

done:
    if (old_raw != small) {
        PyMem_Free(old_raw);
        PyMem_Free(old_values);
    }
    return taken;
}

/* walker.collect(msg, pos, old, new, keyed): a whole INSERT, UPDATE or DELETE message
 * (see collect_into above), for the tests and for one message at a time. */
static PyObject *
walker_collect(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Walker *w = (Walker *)self;
    Py_ssize_t pos;
    int keyed, taken;

    if (nargs != 5 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "collect takes (msg: bytes, pos: int, old, new, keyed: bool)");
        return NULL;
    }
    pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    keyed = PyObject_IsTrue(args[4]);
    if (keyed < 0) {
        return NULL;
    }
    if (!side_ok(w, args[2]) || !side_ok(w, args[3])) {
        PyErr_SetString(PyExc_TypeError, "collect: old and new are None or a tuple of lists, "
                                         "one per wanted column");
        return NULL;
    }
    taken = collect_into(w, (const unsigned char *)PyBytes_AS_STRING(args[0]),
                         PyBytes_GET_SIZE(args[0]), pos, args[2], args[3], keyed);
    if (taken < 0) {
        return NULL;
    }
    return PyLong_FromLong(taken);
}

static PyMethodDef walker_methods[] = {
    {"collect", (PyCFunction)(void (*)(void))walker_collect, METH_FASTCALL,
     PyDoc_STR("collect(msg, pos, old, new, keyed): a change message's wanted values "
               "appended column-wise; 0 when not taken (nothing appended), 1 taken, "
               "2 an UPDATE whose wanted values changed, 3 an UPDATE without old tuple")},
    {NULL, NULL, 0, NULL},
};

static PyObject *
walker_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"ncols", "wanted", "pair", NULL};
    Py_ssize_t ncols, n, i, last = -1;
    PyObject *wanted;
    int pair = 0;
    Walker *w;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nO!|p", keywords, &ncols, &PyTuple_Type,
                                     &wanted, &pair)) {
        return NULL;
    }
    if (ncols < 0 || ncols > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "ncols must be 0 to 65535");
        return NULL;
    }
    n = PyTuple_GET_SIZE(wanted);
    w = (Walker *)type->tp_alloc(type, 0);
    if (w == NULL) {
        return NULL;
    }
    w->vectorcall = walker_call;
    w->ncols = ncols;
    w->pair = pair;
    w->names = PyMem_New(PyObject *, n > 0 ? n : 1);
    w->wanted = PyMem_Calloc(ncols > 0 ? (size_t)ncols : 1, 1);
    if (w->names == NULL || w->wanted == NULL) {
        Py_DECREF(w);
        return PyErr_NoMemory();
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(wanted, i), *name;
        Py_ssize_t index;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2
            || !PyUnicode_Check(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, "wanted: a tuple of (index, name) pairs");
            Py_DECREF(w);
            return NULL;
        }
        index = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 0));
        if (index == -1 && PyErr_Occurred()) {
            Py_DECREF(w);
            return NULL;
        }
        if (index <= last || index >= ncols) {
            PyErr_SetString(PyExc_ValueError,
                            "wanted: indexes ascending, each below ncols, none twice");
            Py_DECREF(w);
            return NULL;
        }
        name = PyTuple_GET_ITEM(item, 1);
        last = index;
        w->names[i] = Py_NewRef(name);
        w->wanted[index] = 1;
        w->nwanted = i + 1; /* what dealloc releases */
    }
    return (PyObject *)w;
}

static void
walker_dealloc(Walker *w)
{
    Py_ssize_t i;
    for (i = 0; i < w->nwanted; i++) {
        Py_DECREF(w->names[i]);
    }
    PyMem_Free(w->names);
    PyMem_Free(w->wanted);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyTypeObject WalkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cdc_invalidator.capture._walk.Walker",
    .tp_doc = PyDoc_STR("Walker(ncols, wanted, pair=False): a compiled tuple walk, "
                        "called as walker(msg, pos)"),
    .tp_basicsize = sizeof(Walker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = walker_new,
    .tp_dealloc = (destructor)walker_dealloc,
    .tp_vectorcall_offset = offsetof(Walker, vectorcall),
    .tp_methods = walker_methods,
    .tp_call = PyVectorcall_Call,
};

/* A Gatherer: the streamed changes of one chunk that collect_into() takes, gathered
 * into packs, one per (kind, subtransaction, relation): the per-message loop of
 * capture/packs.py in C. Called as gatherer.take(msg) for each message of a stream block:
 * True when taken. For a message whose head (type, xid, relation OID: 9 bytes; or,
 * with head=5, type and relation OID, a transaction sent once committed) it has not
 * met, it asks start(msg), which returns None (never take such messages) or the pack's
 * parts: (pack, walker, old, new, positions, keyed); collect_into() then appends to old
 * and new, and the change's position (the decoder's `position` plus one, written back)
 * to positions. drain() hands back each pack with what collect_into() said of its rows,
 * (pack, changed, without_old), and forgets them all. */

#define HEAD 9 /* at most: type byte, xid, relation OID */

typedef struct {
    unsigned char head[HEAD];
    PyObject *pack;      /* NULL: messages with this head are not taken */
    Walker *walker;
    PyObject *old, *new, *positions;
    int keyed, changed, without_old;
} Entry;

typedef struct {
    PyObject_HEAD
    PyObject *start;   /* start(msg) -> parts or None */
    PyObject *decoder; /* its `position` numbers the changes */
    Entry *entries;
    Py_ssize_t count, room, last;
    Py_ssize_t size;   /* changes taken since drain() */
    Py_ssize_t limit;  /* taken at most, until drain() */
    Py_ssize_t head;   /* the head's bytes: 9 in a stream block, 5 outside */
    int busy;          /* in take(): the Python it calls may not take() or drain() */
} Gatherer;

static PyObject *position_name; /* "position", interned */

static void
entry_clear(Entry *e)
{
    Py_CLEAR(e->pack);
    Py_CLEAR(e->walker);
    Py_CLEAR(e->old);
    Py_CLEAR(e->new);
    Py_CLEAR(e->positions);
}

/* The index of the entry for the message's head: found, or made from start(msg); -1
 * with an error set on failure. */
static Py_ssize_t
gatherer_entry(Gatherer *g, PyObject *msg, const unsigned char *head)
{
    Py_ssize_t i;
    PyObject *parts;
    Entry *e;
    int keyed = 0;
    if (g->last >= 0 && memcmp(g->entries[g->last].head, head, (size_t)g->head) == 0) {
        return g->last;
    }
    for (i = 0; i < g->count; i++) {
        if (memcmp(g->entries[i].head, head, (size_t)g->head) == 0) {
            g->last = i;
            return i;
        }
    }
    parts = PyObject_CallOneArg(g->start, msg);
    if (parts == NULL) {
        return -1;
    }
    if (parts != Py_None
        && (!PyTuple_CheckExact(parts) || PyTuple_GET_SIZE(parts) != 6
            || !PyObject_TypeCheck(PyTuple_GET_ITEM(parts, 1), &WalkerType)
            || !PyList_CheckExact(PyTuple_GET_ITEM(parts, 4)))) {
        Py_DECREF(parts);
        PyErr_SetString(PyExc_TypeError,
                        "start() returns None or (pack, walker, old, new, positions, keyed)");
        return -1;
    }
    if (parts != Py_None) {
        Walker *w = (Walker *)PyTuple_GET_ITEM(parts, 1);
        if (!side_ok(w, PyTuple_GET_ITEM(parts, 2)) || !side_ok(w, PyTuple_GET_ITEM(parts, 3))) {
            Py_DECREF(parts);
            PyErr_SetString(PyExc_TypeError, "start(): old and new are None or a tuple of "
                                             "lists, one per wanted column");
            return -1;
        }
        keyed = PyObject_IsTrue(PyTuple_GET_ITEM(parts, 5));
        if (keyed < 0) {
            Py_DECREF(parts);
            return -1;
        }
    }
    if (g->count == g->room) {
        Py_ssize_t room = g->room ? 2 * g->room : 4;
        Entry *grown = PyMem_Resize(g->entries, Entry, room);
        if (grown == NULL) {
            Py_DECREF(parts);
            PyErr_NoMemory();
            return -1;
        }
        g->entries = grown;
        g->room = room;
    }
    e = &g->entries[g->count];
    memset(e, 0, sizeof(*e));
    memcpy(e->head, head, (size_t)g->head);
    if (parts != Py_None) {
        e->pack = Py_NewRef(PyTuple_GET_ITEM(parts, 0));
        e->walker = (Walker *)Py_NewRef(PyTuple_GET_ITEM(parts, 1));
        e->old = Py_NewRef(PyTuple_GET_ITEM(parts, 2));
        e->new = Py_NewRef(PyTuple_GET_ITEM(parts, 3));
        e->positions = Py_NewRef(PyTuple_GET_ITEM(parts, 4));
        e->keyed = keyed;
    }
    Py_DECREF(parts);
    g->last = g->count++;
    return g->last;
}

/* Take back the last value of each list of `side` (None: nothing). */
static void
pop_side(PyObject *side)
{
    Py_ssize_t i;
    if (side == Py_None) {
        return;
    }
    for (i = 0; i < PyTuple_GET_SIZE(side); i++) {
        PyObject *list = PyTuple_GET_ITEM(side, i);
        Py_ssize_t n = PyList_GET_SIZE(list);
        (void)PyList_SetSlice(list, n - 1, n, NULL);
    }
}

static PyObject *gatherer_take_busy(Gatherer *g, PyObject *msg, const unsigned char *bytes,
                                    Py_ssize_t size);

static PyObject *
gatherer_take(PyObject *self, PyObject *msg)
{
    Gatherer *g = (Gatherer *)self;
    const unsigned char *bytes;
    Py_ssize_t size;
    PyObject *result;

    if (!PyBytes_Check(msg)) {
        PyErr_SetString(PyExc_TypeError, "take(msg: bytes)");
        return NULL;
    }
    if (g->busy) {
        PyErr_SetString(PyExc_RuntimeError, "take() or drain() called from inside take()");
        return NULL;
    }
    bytes = (const unsigned char *)PyBytes_AS_STRING(msg);
    size = PyBytes_GET_SIZE(msg);
    if (size <= g->head || g->size >= g->limit
        || !(bytes[0] == 'I' || bytes[0] == 'U' || bytes[0] == 'D')) {
        Py_RETURN_FALSE;
    }
    /* The Python called from here (start(), the decoder's position) takes nothing: the
     * entries, the lists' last items and the count stay this call's own. */
    g->busy = 1;
    result = gatherer_take_busy(g, msg, bytes, size);
    g->busy = 0;
    return result;
}

static PyObject *
gatherer_take_busy(Gatherer *g, PyObject *msg, const unsigned char *bytes, Py_ssize_t size)
{
    Py_ssize_t at, n;
    PyObject *position, *next, *result = NULL;
    PyObject *walker, *old, *new, *positions;
    long long number;
    Entry *e;
    int taken, keyed;

    at = gatherer_entry(g, msg, bytes);
    if (at < 0) {
        return NULL;
    }
    if (g->entries[at].pack == NULL) {
        Py_RETURN_FALSE;
    }
    /* The change's number, as the decoder numbers those it decodes itself: asked for
     * before anything is appended, so that nothing is left half done if it fails. */
    position = PyObject_GetAttr(g->decoder, position_name);
    if (position == NULL) {
        return NULL;
    }
    number = PyLong_AsLongLong(position);
    Py_DECREF(position);
    if (number == -1 && PyErr_Occurred()) {
        return NULL;
    }
    next = PyLong_FromLongLong(number + 1);
    if (next == NULL) {
        return NULL;
    }
    e = &g->entries[at]; /* (busy: the entries did not move while Python ran) */
    walker = Py_NewRef((PyObject *)e->walker);
    old = Py_NewRef(e->old);
    new = Py_NewRef(e->new);
    positions = Py_NewRef(e->positions);
    keyed = e->keyed;
    if (PyList_Append(positions, next) < 0) {
        goto done;
    }
    taken = collect_into((Walker *)walker, bytes, size, g->head, old, new, keyed);
    if (taken <= 0) {
        n = PyList_GET_SIZE(positions);
        (void)PyList_SetSlice(positions, n - 1, n, NULL);
        if (taken == 0) {
            result = Py_NewRef(Py_False);
        }
        goto done;
    }
    if (PyObject_SetAttr(g->decoder, position_name, next) < 0) {
        /* nothing of the change stays: its values and its position are taken back */
        if (bytes[0] != 'I') {
            pop_side(old);
        }
        if (bytes[0] != 'D') {
            pop_side(new);
        }
        n = PyList_GET_SIZE(positions);
        (void)PyList_SetSlice(positions, n - 1, n, NULL);
        goto done;
    }
    g->size++;
    e = &g->entries[at];
    if (taken == 2) {
        e->changed = 1;
    }
    else if (taken == 3) {
        e->without_old = 1;
    }
    result = Py_NewRef(Py_True);
done:
    Py_DECREF(next);
    Py_DECREF(walker);
    Py_DECREF(old);
    Py_DECREF(new);
    Py_DECREF(positions);
    return result;
}

static PyObject *
gatherer_drain(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    Gatherer *g = (Gatherer *)self;
    Py_ssize_t i;
    PyObject *out;
    if (g->busy) {
        PyErr_SetString(PyExc_RuntimeError, "take() or drain() called from inside take()");
        return NULL;
    }
    out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    for (i = 0; i < g->count; i++) {
        Entry *e = &g->entries[i];
        if (e->pack != NULL) {
            PyObject *item = Py_BuildValue("(OOO)", e->pack, e->changed ? Py_True : Py_False,
                                           e->without_old ? Py_True : Py_False);
            if (item == NULL || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(item);
        }
    }
    for (i = 0; i < g->count; i++) {
        entry_clear(&g->entries[i]);
    }
    g->count = 0;
    g->last = -1;
    g->size = 0;
    return out;
}

static PyObject *
gatherer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"start", "decoder", "limit", "head", NULL};
    PyObject *start, *decoder;
    Py_ssize_t limit, head = HEAD;
    Gatherer *g;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOn|n", keywords, &start, &decoder, &limit,
                                     &head)) {
        return NULL;
    }
    if (head != 9 && head != 5) {
        PyErr_SetString(PyExc_ValueError, "head must be 9 (a stream block's) or 5");
        return NULL;
    }
    if (!PyCallable_Check(start)) {
        PyErr_SetString(PyExc_TypeError, "start must be callable");
        return NULL;
    }
    g = (Gatherer *)type->tp_alloc(type, 0);
    if (g == NULL) {
        return NULL;
    }
    g->start = Py_NewRef(start);
    g->decoder = Py_NewRef(decoder);
    g->limit = limit;
    g->head = head;
    g->last = -1;
    return (PyObject *)g;
}

static int
gatherer_traverse(Gatherer *g, visitproc visit, void *arg)
{
    Py_ssize_t i;
    Py_VISIT(g->start);
    Py_VISIT(g->decoder);
    for (i = 0; i < g->count; i++) {
        Py_VISIT(g->entries[i].pack);
        Py_VISIT(g->entries[i].walker);
        Py_VISIT(g->entries[i].old);
        Py_VISIT(g->entries[i].new);
        Py_VISIT(g->entries[i].positions);
    }
    return 0;
}

static int
gatherer_clear(Gatherer *g)
{
    Py_ssize_t i;
    Py_CLEAR(g->start);
    Py_CLEAR(g->decoder);
    for (i = 0; i < g->count; i++) {
        entry_clear(&g->entries[i]);
    }
    g->count = 0;
    g->last = -1;
    return 0;
}

static void
gatherer_dealloc(Gatherer *g)
{
    PyObject_GC_UnTrack(g);
    gatherer_clear(g);
    PyMem_Free(g->entries);
    Py_TYPE(g)->tp_free((PyObject *)g);
}

static PyObject *
gatherer_get_size(Gatherer *g, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(g->size);
}

static PyMethodDef gatherer_methods[] = {
    {"take", (PyCFunction)gatherer_take, METH_O,
     PyDoc_STR("take(msg): whether the streamed change was gathered into a pack")},
    {"drain", (PyCFunction)gatherer_drain, METH_NOARGS,
     PyDoc_STR("drain(): [(pack, changed, without_old)] of the packs, all forgotten")},
    {NULL, NULL, 0, NULL},
};

static PyObject *
gatherer_get_limit(Gatherer *g, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(g->limit);
}

static int
gatherer_set_limit(Gatherer *g, PyObject *value, void *Py_UNUSED(closure))
{
    Py_ssize_t limit;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "limit cannot be deleted");
        return -1;
    }
    limit = PyLong_AsSsize_t(value);
    if (limit == -1 && PyErr_Occurred()) {
        return -1;
    }
    g->limit = limit;
    return 0;
}

static PyGetSetDef gatherer_getset[] = {
    {"size", (getter)gatherer_get_size, NULL, PyDoc_STR("changes taken since drain()"), NULL},
    {"limit", (getter)gatherer_get_limit, (setter)gatherer_set_limit,
     PyDoc_STR("changes taken at most until drain()"), NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject GathererType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cdc_invalidator.capture._walk.Gatherer",
    .tp_doc = PyDoc_STR("Gatherer(start, decoder, limit, head=9): a chunk's changes "
                        "gathered into packs (capture/packs.py)"),
    .tp_basicsize = sizeof(Gatherer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = gatherer_new,
    .tp_dealloc = (destructor)gatherer_dealloc,
    .tp_traverse = (traverseproc)gatherer_traverse,
    .tp_clear = (inquiry)gatherer_clear,
    .tp_methods = gatherer_methods,
    .tp_getset = gatherer_getset,
};

static struct PyModuleDef walk_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cdc_invalidator.capture._walk",
    .m_doc = PyDoc_STR("pgoutput tuple walks in C (capture/pgoutput.py's fast path)."),
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__walk(void)
{
    PyObject *module;
    if (PyType_Ready(&WalkerType) < 0 || PyType_Ready(&GathererType) < 0) {
        return NULL;
    }
    position_name = PyUnicode_InternFromString("position");
    if (position_name == NULL) {
        return NULL;
    }
    module = PyModule_Create(&walk_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Walker", (PyObject *)&WalkerType) < 0
        || PyModule_AddObjectRef(module, "Gatherer", (PyObject *)&GathererType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
