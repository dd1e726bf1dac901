/* Three loops over tiny items, in C; where this module could not be built the first two run
   in Python, and lists go as plain pickles instead of packed:
   run:         a worker's item loop: each item's offset into the shared record, then
                fn(item) appended to values (stagepool/_worker_loop.py, _loop);
   read_within: the parent's read of a chunk from an iterator, stopping before the item whose
                nbytes would pass a bound (stagepool/_reading.py);
   pack:        a list of plain ints or floats as the bytes of an array (stagepool/_transport.py,
                packed): faster to pickle and to unpickle than the list (figures there). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <time.h>

#ifdef CLOCK_MONOTONIC_COARSE
#define TICK_CLOCK CLOCK_MONOTONIC_COARSE /* a few ns through the vDSO, ticks every 1-4 ms */
#else
#define TICK_CLOCK CLOCK_MONOTONIC
#endif

static long long
coarse_ticks(void)
{
    struct timespec now;
    clock_gettime(TICK_CLOCK, &now);
    return (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
}

/* run(fn, items, values, slot, field) -> None
   For i = len(values) while i < len(items): slot[field] = i (an int64 in the buffer ``slot``),
   then values.append(fn(items[i])). ``items`` may be emptied meanwhile (by another thread, or
   an at-fork hook): the loop ends after the running item. An exception from fn propagates,
   values holding the results before it (its offset is len(values)). */
static PyObject *
tinyloop_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "run(fn, items, values, slot, field)");
        return NULL;
    }
    PyObject *fn = args[0], *items = args[1], *values = args[2], *slot = args[3];
    if (!PyList_Check(items) || !PyList_Check(values)) {
        PyErr_SetString(PyExc_TypeError, "items and values must be lists");
        return NULL;
    }
    Py_ssize_t field = PyLong_AsSsize_t(args[4]);
    if (field == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(slot, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    if (field < 0 || (Py_ssize_t)((field + 1) * sizeof(int64_t)) > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_IndexError, "field out of the slot");
        return NULL;
    }
    volatile int64_t *offset = (volatile int64_t *)view.buf + field;
    /* A Python function runs the eval loop, which hands the GIL to a thread that asked for it
       (the budget thread, the parent watch); a builtin (math.factorial, a C extension's
       function) does not: the GIL is let go after its item once the coarse clock ticked (1-4
       ms), else a chunk of slow C items never let the budget stop it (0.59 s against 0.25 s in
       Python: 3,000 factorial(10) then 300 factorial(6000), all slow ones on one worker).
       After every item it cost ~45 ns of abs's ~65; a coarse clock read costs a few. */
    int let_go = !PyFunction_Check(fn);
    long long ticked = let_go ? coarse_ticks() : 0;
    Py_ssize_t i = PyList_GET_SIZE(values);
    while (i < PyList_GET_SIZE(items)) {
        *offset = (int64_t)i;
        PyObject *item = PyList_GET_ITEM(items, i);
        Py_INCREF(item);  /* the list may let go of it while fn runs */
        PyObject *value = PyObject_CallOneArg(fn, item);
        Py_DECREF(item);
        if (value == NULL) {
            goto failed;
        }
        int appended = PyList_Append(values, value);
        Py_DECREF(value);
        if (appended < 0) {
            goto failed;
        }
        i++;
        if (let_go && coarse_ticks() != ticked) {
            Py_BEGIN_ALLOW_THREADS  /* a thread that asked for the GIL runs first */
            Py_END_ALLOW_THREADS
            ticked = coarse_ticks();
        }
        if ((i & 1023) == 0 && PyErr_CheckSignals() < 0) {  /* an in-process run's Ctrl-C */
            goto failed;
        }
    }
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
failed:  /* the exception is set: fn's, or a signal handler's */
    PyBuffer_Release(&view);
    return NULL;
}

/* total + n for a size n (a Python int): saturating at LLONG_MAX, past any bound (a plain +=
   overflowed there: 1 + (2**63 - 1) came out negative, and the read took every item after it);
   a negative size counts 0, as an unknown one does. */
static long long
add_size(long long total, PyObject *n_obj)
{
    int overflow = 0;
    long long n = PyLong_AsLongLongAndOverflow(n_obj, &overflow);
    if (overflow > 0 || (n > 0 && total > LLONG_MAX - n)) {
        return LLONG_MAX;
    }
    return overflow < 0 || n < 0 ? total : total + n;
}

/* Parts of a tuple or list item whose sizes count (see read_within). */
#define MAX_PARTS 16

/* Adds obj's size to *total: its nbytes, when an int or an integer with __index__ (numpy's)
   above 0; one that raises an Exception, is anything else or is negative counts 0. Returns 1
   when obj has an nbytes, 0 when it has none, -1 for an exception that must propagate (Ctrl-C,
   SystemExit: anything but an Exception). */
static int
count_size(PyObject *obj, PyObject *name, long long *total)
{
    PyObject *nbytes = NULL;
    int found = _PyObject_LookupAttr(obj, name, &nbytes);
    if (found < 0) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            return -1;
        }
        PyErr_Clear();  /* the item's own bug: an unknown size, counted 0 (_reading) */
        return 1;
    }
    if (nbytes == NULL) {
        return 0;
    }
    PyObject *n = PyLong_Check(nbytes) ? Py_NewRef(nbytes)
                  : PyIndex_Check(nbytes) ? PyNumber_Index(nbytes) : NULL;
    Py_DECREF(nbytes);
    if (n == NULL && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            return -1;
        }
        PyErr_Clear();  /* a broken __index__: an unknown size */
    }
    if (n != NULL) {
        *total = add_size(*total, n);
        Py_DECREF(n);
    }
    return 1;
}

/* read_within(it, size, max_bytes, into, nothing) -> the item that would have passed the
   bound (already read), or ``nothing``. Appends up to size items of it to into while their
   sizes (count_size; a tuple or list without an nbytes: the sum of its first MAX_PARTS
   parts') add up to at most max_bytes. An exception of the iterator propagates, the items
   read before it in into. */
static PyObject *
tinyloop_read_within(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "read_within(it, size, max_bytes, into, nothing)");
        return NULL;
    }
    PyObject *it = args[0], *into = args[3], *nothing = args[4];
    if (!PyIter_Check(it) || !PyList_Check(into)) {
        PyErr_SetString(PyExc_TypeError, "it must be an iterator and into a list");
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[1]);
    if (size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long long max_bytes = PyLong_AsLongLong(args[2]);
    if (max_bytes == -1 && PyErr_Occurred()) {
        return NULL;
    }
    static PyObject *nbytes_name = NULL;
    if (nbytes_name == NULL && (nbytes_name = PyUnicode_InternFromString("nbytes")) == NULL) {
        return NULL;
    }
    long long total = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        PyObject *item = PyIter_Next(it);
        if (item == NULL) {
            if (PyErr_Occurred()) {
                return NULL;
            }
            break;
        }
        int had = count_size(item, nbytes_name, &total);
        /* A tuple or list without a size of its own: its first parts' sizes ((meta, array)
           pairs, a segment's fields). The list may shrink under a property's code. */
        if (had == 0 && (PyTuple_Check(item) || PyList_Check(item))) {
            for (Py_ssize_t k = 0; had == 0 && k < MAX_PARTS
                                 && k < PySequence_Fast_GET_SIZE(item); k++) {
                PyObject *part = Py_NewRef(PySequence_Fast_GET_ITEM(item, k));
                had = count_size(part, nbytes_name, &total) < 0 ? -1 : 0;
                Py_DECREF(part);
            }
        }
        if (had < 0) {
            Py_DECREF(item);
            return NULL;
        }
        if (total > max_bytes) {
            return item;  /* the caller's reference */
        }
        int failed = PyList_Append(into, item);
        Py_DECREF(item);
        if (failed) {
            return NULL;
        }
    }
    Py_INCREF(nothing);
    return nothing;
}

/* array typecodes of the widths pack() writes: 'b' 'h' 'i' 'q' and 'd' in the parent's and the
   worker's array modules (the same build of Python on the same machine). */
_Static_assert(sizeof(signed char) == 1 && sizeof(short) == 2 && sizeof(int) == 4
               && sizeof(long long) == 8 && sizeof(double) == 8, "array typecode widths");

/* Whether ``obj`` is an exact int that fits in 64 bits, its value in *out. Calls no Python
   code and sets no exception. A compact int (one digit: |v| < 2**30) is read directly. */
static inline int
long_value(PyObject *obj, long long *out)
{
    if (!PyLong_CheckExact(obj)) {
        return 0;
    }
#if PY_VERSION_HEX >= 0x030C0000
    if (PyUnstable_Long_IsCompact((PyLongObject *)obj)) {
        *out = (long long)PyUnstable_Long_CompactValue((PyLongObject *)obj);
        return 1;
    }
#else
    Py_ssize_t size = Py_SIZE(obj);
    if (size >= -1 && size <= 1) {
        *out = size * (long long)((PyLongObject *)obj)->ob_digit[0];
        return 1;
    }
#endif
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
}

/* pack(values) -> (typecode, raw) or None.
   A list of exact ints that all fit in 64 bits, as the bytes of an array of the narrowest of
   'b', 'h', 'i', 'q' that holds them all; a list of exact floats as an array 'd'; None for
   anything else (an empty list, bools, int or float subclasses, a mix, a big int). Calls no
   Python code: the list cannot change under it. */
static PyObject *
tinyloop_pack(PyObject *module, PyObject *values)
{
    if (!PyList_Check(values) || PyList_GET_SIZE(values) == 0) {
        Py_RETURN_NONE;
    }
    Py_ssize_t n = PyList_GET_SIZE(values);
    PyObject **item = ((PyListObject *)values)->ob_item;
    if (PyFloat_CheckExact(item[0])) {
        for (Py_ssize_t i = 1; i < n; i++) {
            if (!PyFloat_CheckExact(item[i])) {
                Py_RETURN_NONE;
            }
        }
        PyObject *raw = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(double));
        if (raw == NULL) {
            return NULL;
        }
        double *out = (double *)PyBytes_AS_STRING(raw);
        for (Py_ssize_t i = 0; i < n; i++) {
            out[i] = PyFloat_AS_DOUBLE(item[i]);
        }
        return Py_BuildValue("(sN)", "d", raw);
    }
    /* The values as int64 first (one pass over the objects, compact ints read directly),
       then narrowed from there: PyLong_AsLongLongAndOverflow twice per int was ~10 ns of the
       ~10 ns an int cost. */
    long long *wide = PyMem_Malloc((size_t)n * sizeof(long long));
    if (wide == NULL) {
        return PyErr_NoMemory();
    }
    long long lo = LLONG_MAX, hi = LLONG_MIN;
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v;
        if (!long_value(item[i], &v)) {
            PyMem_Free(wide);
            Py_RETURN_NONE;
        }
        wide[i] = v;
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    int width = lo >= SCHAR_MIN && hi <= SCHAR_MAX ? 1
                : lo >= SHRT_MIN && hi <= SHRT_MAX ? 2
                : lo >= INT_MIN && hi <= INT_MAX ? 4 : 8;
    PyObject *raw = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)width);
    if (raw == NULL) {
        PyMem_Free(wide);
        return NULL;
    }
    char *out = PyBytes_AS_STRING(raw);
    switch (width) {
    case 1: for (Py_ssize_t i = 0; i < n; i++) ((signed char *)out)[i] = (signed char)wide[i]; break;
    case 2: for (Py_ssize_t i = 0; i < n; i++) ((short *)out)[i] = (short)wide[i]; break;
    case 4: for (Py_ssize_t i = 0; i < n; i++) ((int *)out)[i] = (int)wide[i]; break;
    default: memcpy(out, wide, (size_t)n * sizeof(long long)); break;
    }
    PyMem_Free(wide);
    return Py_BuildValue("(sN)", width == 1 ? "b" : width == 2 ? "h" : width == 4 ? "i" : "q", raw);
}

static PyMethodDef tinyloop_methods[] = {
    {"run", (PyCFunction)(void (*)(void))tinyloop_run, METH_FASTCALL,
     "run(fn, items, values, slot, field): the tiny-item loop (see _worker_loop)."},
    {"read_within", (PyCFunction)(void (*)(void))tinyloop_read_within, METH_FASTCALL,
     "read_within(it, size, max_bytes, into, nothing): a chunk within a byte bound (see _reading)."},
    {"pack", (PyCFunction)tinyloop_pack, METH_O,
     "pack(values): a list of plain ints or floats as (array typecode, bytes), else None (see _transport)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef tinyloop_module = {
    PyModuleDef_HEAD_INIT, "_tinyloop", NULL, 0, tinyloop_methods,
};

PyMODINIT_FUNC
PyInit__tinyloop(void)
{
    return PyModule_Create(&tinyloop_module);
}
