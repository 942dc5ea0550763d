// `mapet._core`: the module table. Each area contributes its methods in its own file.
import CPythonBridge
import MaPeTKernels
#if canImport(Glibc)
import Glibc
#endif

/// One METH_FASTCALL method of the module.
struct Method {
    let name: String
    let function: mapet_fastcall_fn
    let doc: String
}

nonisolated(unsafe) private var methodTable: UnsafeMutablePointer<PyMethodDef>? = nil

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
    let table = UnsafeMutablePointer<PyMethodDef>.allocate(capacity: all.count + 1)
    for (i, m) in all.enumerated() {
        table[i] = mapet_method_def(strdup(m.name), m.function, strdup(m.doc))
    }
    table[all.count] = PyMethodDef()
    methodTable = table
    guard let module = mapet_module_create("mapet._core", "Swift engine of mapet.", table) else { return nil }
    guard registerTensorType(in: module) else { mapet_py_decref(module); return nil }
    guard mapet_capture_main_thread() == 0 else { mapet_py_decref(module); return nil }
    Parallel.threadCount = Parallel.threadCount  // pins OpenBLAS to one thread
    return module
}
