/* The tiny-item loop of a worker, in C: each item's offset into the shared record, then
   fn(item) appended to values. See stagepool/_worker_loop.py (_loop), which uses it when it
   could be built and falls back on the same loop in Python otherwise. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

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
    Py_ssize_t i = PyList_GET_SIZE(values);
    while (i < PyList_GET_SIZE(items)) {
        *offset = (int64_t)i;
        PyObject *item = PyList_GET_ITEM(items, i);
        Py_INCREF(item);  /* the list may let go of it while fn runs */
        PyObject *value = PyObject_CallOneArg(fn, item);
        Py_DECREF(item);
        if (value == NULL) {
            PyBuffer_Release(&view);
            return NULL;
        }
        int failed = PyList_Append(values, value);
        Py_DECREF(value);
        if (failed) {
            PyBuffer_Release(&view);
            return NULL;
        }
        i++;
        if ((i & 1023) == 0 && PyErr_CheckSignals() < 0) {  /* an in-process run's Ctrl-C */
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef tinyloop_methods[] = {
    {"run", (PyCFunction)(void (*)(void))tinyloop_run, METH_FASTCALL,
     "run(fn, items, values, slot, field): the tiny-item loop (see _worker_loop)."},
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
