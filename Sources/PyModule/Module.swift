// `mapet._core`: the module table. Each area contributes its methods in its own file.
import CPythonBridge
import MaPeTKernels
#if canImport(Glibc)
import Glibc
#endif

/// One METH_FASTCALL method of the module. `Method("name", { args in ... }, doc: "...")` is the
/// registration helper: the name is written once, the body gets the positional arguments as
/// `Args` (whose errors name the function) and any thrown `PyError` becomes the Python exception.
/// `Method(name:function:doc:)` registers a raw C entry instead.
struct Method {
    typealias Body = (Args) throws -> PyObj?

    let name: String
    let function: mapet_fastcall_fn?
    let body: Body?
    let doc: String

    init(name: String, function: mapet_fastcall_fn, doc: String) {
        (self.name, self.function, self.body, self.doc) = (name, function, nil, doc)
    }

    init(_ name: String, _ body: @escaping Body, doc: String) {
        (self.name, self.function, self.body, self.doc) = (name, nil, body, doc)
    }
}

nonisolated(unsafe) private var methodTable: UnsafeMutablePointer<PyMethodDef>? = nil
/// The bodies of `Method(name, body)` entries; each one's Python function carries its index as `self`.
nonisolated(unsafe) private var bodies: [(name: String, body: Method.Body)] = []

/// The one C entry of every body method: `self` is the body's index (a Python int).
private let dispatch: mapet_fastcall_fn = { index, args, nargs in
    let entry = bodies[PyLong_AsSsize_t(index)]
    return call(args, nargs, entry.name, entry.body)
}

@_cdecl("PyInit__core")
public func PyInit__core() -> UnsafeMutablePointer<PyObject>? {
    let all: [Method] = runtimeMethods
        + tensorMethods
        + kernelMethods
        + objectiveMethods
        + samplingMethods
        + layerKernelMethods
        + modelMethods
        + kmeansMethods
        + pretrainModelMethods
        + convMethods
        + clipMethods
    let raw = all.filter { $0.function != nil }, bound = all.filter { $0.body != nil }
    let table = UnsafeMutablePointer<PyMethodDef>.allocate(capacity: raw.count + 1)
    for (i, m) in raw.enumerated() {
        table[i] = mapet_method_def(strdup(m.name), m.function!, strdup(m.doc))
    }
    table[raw.count] = PyMethodDef()
    methodTable = table
    guard let module = mapet_module_create("mapet._core", "Swift engine of mapet.", table) else { return nil }
    // body methods: one PyMethodDef each (kept for the interpreter's life) bound to its index
    let defs = UnsafeMutablePointer<PyMethodDef>.allocate(capacity: max(1, bound.count))
    for (i, m) in bound.enumerated() {
        bodies.append((m.name, m.body!))
        defs[i] = mapet_method_def(strdup(m.name), dispatch, strdup(m.doc))
        guard let index = PyLong_FromSsize_t(i) else { mapet_py_decref(module); return nil }
        let function = mapet_function_new(defs + i, index, module)
        mapet_py_decref(index)
        guard let function, PyModule_AddObject(module, m.name, function) == 0 else {
            if let function { mapet_py_decref(function) }
            mapet_py_decref(module)
            return nil
        }
    }
    guard registerTensorType(in: module) else { mapet_py_decref(module); return nil }
    guard mapet_capture_main_thread() == 0 else { mapet_py_decref(module); return nil }
    Parallel.threadCount = Parallel.threadCount  // pins OpenBLAS to one thread
    return module
}
