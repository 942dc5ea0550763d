// Small static-inline shims over Python.h for what Swift cannot import directly:
// macros (Py_None, Py_INCREF, type checks), exception globals, variadic calls and
// PyModuleDef_HEAD_INIT. No logic lives here.
#ifndef MAPET_CPYTHON_BRIDGE_H
#define MAPET_CPYTHON_BRIDGE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

static inline PyObject *mapet_py_none(void) { Py_INCREF(Py_None); return Py_None; }
static inline int mapet_py_is_none(PyObject *o) { return o == Py_None; }
static inline PyObject *mapet_py_true(void) { Py_INCREF(Py_True); return Py_True; }
static inline PyObject *mapet_py_false(void) { Py_INCREF(Py_False); return Py_False; }
static inline void mapet_py_incref(PyObject *o) { Py_INCREF(o); }
static inline void mapet_py_decref(PyObject *o) { Py_DECREF(o); }
static inline void mapet_py_xdecref(PyObject *o) { Py_XDECREF(o); }

static inline int mapet_py_long_check(PyObject *o) { return PyLong_Check(o); }
static inline int mapet_py_bool_check(PyObject *o) { return PyBool_Check(o); }
static inline int mapet_py_float_check(PyObject *o) { return PyFloat_Check(o); }
static inline int mapet_py_unicode_check(PyObject *o) { return PyUnicode_Check(o); }
static inline int mapet_py_tuple_check(PyObject *o) { return PyTuple_Check(o); }
static inline int mapet_py_list_check(PyObject *o) { return PyList_Check(o); }
static inline int mapet_py_dict_check(PyObject *o) { return PyDict_Check(o); }
static inline const char *mapet_py_type_name(PyObject *o) { return Py_TYPE(o)->tp_name; }

static inline PyObject *mapet_exc_type_error(void) { return PyExc_TypeError; }
static inline PyObject *mapet_exc_value_error(void) { return PyExc_ValueError; }
static inline PyObject *mapet_exc_runtime_error(void) { return PyExc_RuntimeError; }
static inline PyObject *mapet_exc_memory_error(void) { return PyExc_MemoryError; }
static inline PyObject *mapet_exc_index_error(void) { return PyExc_IndexError; }
static inline PyObject *mapet_exc_key_error(void) { return PyExc_KeyError; }
static inline PyObject *mapet_exc_overflow_error(void) { return PyExc_OverflowError; }
static inline PyObject *mapet_exc_buffer_error(void) { return PyExc_BufferError; }

static inline void mapet_set_error(PyObject *type, const char *message) {
    PyErr_SetString(type, message);
}

typedef PyObject *(*mapet_fastcall_fn)(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

/// A METH_FASTCALL method table entry (the cast that Swift cannot write).
static inline PyMethodDef mapet_method_def(const char *name, mapet_fastcall_fn fn, const char *doc) {
    PyMethodDef def = { name, (PyCFunction)(void (*)(void))fn, METH_FASTCALL, doc };
    return def;
}

/// A module function for `def` whose `self` is `self_obj` (a new reference; `self_obj` is not stolen).
static inline PyObject *mapet_function_new(PyMethodDef *def, PyObject *self_obj, PyObject *module) {
    PyObject *name = PyModule_GetNameObject(module);
    if (name == NULL) return NULL;
    PyObject *f = PyCFunction_NewEx(def, self_obj, name);
    Py_DECREF(name);
    return f;
}

/// The one module definition of `mapet._core`; methods must outlive the interpreter.
static inline PyObject *mapet_module_create(const char *name, const char *doc, PyMethodDef *methods) {
    static PyModuleDef def = { PyModuleDef_HEAD_INIT };
    def.m_name = name;
    def.m_doc = doc;
    def.m_size = -1;
    def.m_methods = methods;
    return PyModule_Create(&def);
}

/// Python object layout of `mapet._core.Tensor`: a Swift-owned buffer (retained `owner`)
/// with up to 8 dimensions, exported through the buffer protocol.
#define MAPET_TENSOR_MAX_DIMS 8
typedef struct {
    PyObject_HEAD
    void *owner;           // Unmanaged<TensorStorage>, retained by this object
    void *data;            // first element
    Py_ssize_t ndim;
    Py_ssize_t itemsize;
    Py_ssize_t shape[MAPET_TENSOR_MAX_DIMS];
    Py_ssize_t strides[MAPET_TENSOR_MAX_DIMS];
    char format[4];
    int readonly;
} MapetTensorObject;

static inline unsigned long mapet_tpflags_default(void) { return Py_TPFLAGS_DEFAULT; }
static inline Py_ssize_t mapet_tensor_basicsize(void) { return (Py_ssize_t)sizeof(MapetTensorObject); }
static inline MapetTensorObject *mapet_as_tensor(PyObject *o) { return (MapetTensorObject *)o; }
static inline PyObject *mapet_tensor_as_object(MapetTensorObject *t) { return (PyObject *)t; }
static inline int mapet_is_instance_of(PyObject *o, PyObject *type) {
    return PyObject_TypeCheck(o, (PyTypeObject *)type);
}
static inline PyObject *mapet_type_alloc(PyObject *type) {
    PyTypeObject *tp = (PyTypeObject *)type;
    return tp->tp_alloc(tp, 0);
}
static inline void mapet_tensor_free(PyObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp);  // heap types own a reference from each instance
}

// Ctrl-C and interpreter exit during long native calls (bridge.c). begin/end with the GIL
// held, around the GIL-released work; begin returns whether the caller is the main thread.
int mapet_capture_main_thread(void);
int mapet_interrupt_begin(void);
void mapet_interrupt_end(void);
void mapet_interrupt_body_done(void);   // without the GIL, as the work ends
int mapet_interrupt_pending(int is_main);
int mapet_shutdown_requested(void);
void mapet_request_shutdown(double timeout_seconds);

#endif
