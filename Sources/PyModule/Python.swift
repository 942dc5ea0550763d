// Conversions between Python objects and Swift values, errors, the GIL and handles.
import CPythonBridge
import MaPeTKernels
#if canImport(Glibc)
import Glibc
#endif

typealias PyObj = UnsafeMutablePointer<PyObject>

/// A Python exception to raise, carried through Swift `throws`.
struct PyError: Error {
    enum Kind { case type, value, runtime, memory, index, key, overflow }
    let kind: Kind
    let message: String

    static func type(_ m: String) -> PyError { PyError(kind: .type, message: m) }
    static func value(_ m: String) -> PyError { PyError(kind: .value, message: m) }
    static func runtime(_ m: String) -> PyError { PyError(kind: .runtime, message: m) }
    static func memory(_ m: String) -> PyError { PyError(kind: .memory, message: m) }
    static func key(_ m: String) -> PyError { PyError(kind: .key, message: m) }

    func raise() {
        let exc: PyObj
        switch kind {
        case .type: exc = mapet_exc_type_error()
        case .value: exc = mapet_exc_value_error()
        case .runtime: exc = mapet_exc_runtime_error()
        case .memory: exc = mapet_exc_memory_error()
        case .index: exc = mapet_exc_index_error()
        case .key: exc = mapet_exc_key_error()
        case .overflow: exc = mapet_exc_overflow_error()
        }
        mapet_set_error(exc, message)
    }
}

/// Marker: a Python exception is already set (a C-API call failed).
struct PythonErrorSet: Error {}

/// Runs a method body, turning thrown errors into a raised Python exception (nil return).
func call(_ args: UnsafePointer<PyObj?>?, _ nargs: Int, _ name: String,
          _ body: (Args) throws -> PyObj?) -> PyObj? {
    let t0 = Profiler.beginSpan(); defer { Profiler.endSpan(.extensionCall, t0) }
    do {
        return try body(Args(base: args, count: nargs, function: "\(name)"))
    } catch let e as PyError {
        e.raise()
        return nil
    } catch is PythonErrorSet {
        return nil
    } catch {
        PyError.runtime("\(name): \(error)").raise()
        return nil
    }
}

func typeName(_ o: PyObj) -> String { String(cString: mapet_py_type_name(o)) }

/// Runs `body` on the entries `keys` of the dict `obj` as if they were positional arguments
/// (so one set of `Args` conversions and messages serves both): a config crosses the boundary as
/// one dict. A missing or unknown key raises, naming it.
func withConfig<T>(_ obj: PyObj, keys: [String], function: String, _ body: (Args) throws -> T) throws -> T {
    let size = PyDict_Size(obj)
    if size < 0 {
        PyErr_Clear()
        throw PyError.type("config: expected a dict, got \(typeName(obj))")
    }
    let values = UnsafeMutablePointer<PyObj?>.allocate(capacity: max(1, keys.count))
    defer { values.deallocate() }
    for (i, key) in keys.enumerated() {
        guard let v = PyDict_GetItemString(obj, key) else {  // borrowed: the dict holds it
            throw PyError.value("config: missing '\(key)' (expected the keys \(keys.joined(separator: ", ")))")
        }
        values[i] = v
    }
    guard size == keys.count else {
        throw PyError.value("config: unknown keys besides \(keys.joined(separator: ", ")) (\(size) keys given)")
    }
    return try body(Args(base: UnsafePointer(values), count: keys.count, function: function))
}

/// Positional arguments of a METH_FASTCALL call.
struct Args {
    let base: UnsafePointer<PyObj?>?
    let count: Int
    let function: String

    func expect(_ n: Int) throws {
        guard count == n else {
            throw PyError.type("\(function)() takes \(n) positional arguments but \(count) were given")
        }
    }

    subscript(_ i: Int) -> PyObj { base![i]! }

    func isNone(_ i: Int) -> Bool { mapet_py_is_none(self[i]) != 0 }

    func int(_ i: Int, _ name: String, min: Int? = nil, max: Int? = nil) throws -> Int {
        try Args.index(self[i], name, min: min, max: max)
    }

    /// `o` as an Int through `__index__` (bools refused), within [min, max] when given.
    static func index(_ o: PyObj, _ name: String, min: Int? = nil, max: Int? = nil) throws -> Int {
        guard mapet_py_bool_check(o) == 0 else { throw PyError.type("\(name): expected an int, got bool") }
        guard let idx = PyNumber_Index(o) else {
            PyErr_Clear()
            throw PyError.type("\(name): expected an int, got \(typeName(o))")
        }
        defer { mapet_py_decref(idx) }
        var overflow: Int32 = 0
        let v = PyLong_AsLongLongAndOverflow(idx, &overflow)
        guard overflow == 0 else { throw PyError.value("\(name): \(overflow > 0 ? "too large" : "too small") for a 64-bit integer") }
        if let min, v < min { throw PyError.value("\(name): expected an int ≥ \(min), got \(v)") }
        if let max, v > max { throw PyError.value("\(name): expected an int ≤ \(max), got \(v)") }
        return Int(v)
    }

    func double(_ i: Int, _ name: String) throws -> Double {
        let o = self[i]
        let v = PyFloat_AsDouble(o)
        if v == -1, PyErr_Occurred() != nil {
            PyErr_Clear()
            throw PyError.type("\(name): expected a float, got \(typeName(o))")
        }
        return v
    }

    func finiteDouble(_ i: Int, _ name: String) throws -> Double {
        let v = try double(i, name)
        guard v.isFinite else { throw PyError.value("\(name): expected a finite number, got \(v)") }
        return v
    }

    func bool(_ i: Int, _ name: String) throws -> Bool {
        let r = PyObject_IsTrue(self[i])
        if r < 0 { throw PythonErrorSet() }
        return r != 0
    }

    func string(_ i: Int, _ name: String) throws -> String {
        let o = self[i]
        guard mapet_py_unicode_check(o) != 0, let c = PyUnicode_AsUTF8(o) else {
            PyErr_Clear()
            throw PyError.type("\(name): expected a str, got \(typeName(o))")
        }
        return String(cString: c)
    }

    /// A sequence of ints (list or tuple).
    func ints(_ i: Int, _ name: String) throws -> [Int] {
        let o = self[i]
        guard mapet_py_list_check(o) != 0 || mapet_py_tuple_check(o) != 0 else {
            throw PyError.type("\(name): expected a list or tuple of ints, got \(typeName(o))")
        }
        let n = PySequence_Size(o)
        var out: [Int] = []
        for k in 0..<n {
            guard let item = PySequence_GetItem(o, k) else { throw PythonErrorSet() }
            defer { mapet_py_decref(item) }
            guard mapet_py_long_check(item) != 0, mapet_py_bool_check(item) == 0 else {
                throw PyError.type("\(name)[\(k)]: expected an int, got \(typeName(item))")
            }
            var overflow: Int32 = 0
            let v = PyLong_AsLongLongAndOverflow(item, &overflow)
            guard overflow == 0 else { throw PyError.value("\(name)[\(k)]: too large") }
            out.append(Int(v))
        }
        return out
    }

    /// The Swift object behind a handle made by `makeHandle`.
    func handle<T: AnyObject>(_ i: Int, _ name: String, _ type: T.Type) throws -> T {
        let o = self[i]
        guard PyCapsule_IsValid(o, handleName) != 0,
              let p = PyCapsule_GetPointer(o, handleName) else {
            PyErr_Clear()
            throw PyError.type("\(name): expected a mapet handle, got \(typeName(o))")
        }
        guard let t = Unmanaged<AnyObject>.fromOpaque(p).takeUnretainedValue() as? T else {
            throw PyError.type("\(name): handle holds a different kind of object than \(T.self)")
        }
        return t
    }
}

// MARK: Building results

func none() -> PyObj { mapet_py_none() }
func pyBool(_ b: Bool) -> PyObj { b ? mapet_py_true() : mapet_py_false() }
func pyInt(_ v: Int) -> PyObj? { PyLong_FromLongLong(Int64(v)) }
func pyFloat(_ v: Double) -> PyObj? { PyFloat_FromDouble(v) }
func pyString(_ s: String) -> PyObj? { PyUnicode_FromString(s) }

/// A new tuple; steals the item references, fails (and releases them) if any is nil.
func pyTuple(_ items: [PyObj?]) throws -> PyObj {
    guard items.allSatisfy({ $0 != nil }), let t = PyTuple_New(items.count) else {
        for case let i? in items { mapet_py_decref(i) }
        throw PythonErrorSet()
    }
    for (k, item) in items.enumerated() { PyTuple_SetItem(t, k, item) }
    return t
}

func pyList(_ items: [PyObj?]) throws -> PyObj {
    guard items.allSatisfy({ $0 != nil }), let l = PyList_New(items.count) else {
        for case let i? in items { mapet_py_decref(i) }
        throw PythonErrorSet()
    }
    for (k, item) in items.enumerated() { PyList_SetItem(l, k, item) }
    return l
}

// MARK: The GIL

/// Runs `body` with the GIL released. `body` must not touch Python objects.
func withoutGIL<R>(_ body: () throws -> R) rethrows -> R {
    let state = PyEval_SaveThread()
    let t0 = Profiler.beginSpan()
    defer { Profiler.endSpan(.native, t0); PyEval_RestoreThread(state) }
    return try body()
}

/// Runs `body` with the GIL released, handing it a `stop` predicate to poll at chunk
/// boundaries: true once Ctrl-C was pressed (calls made from the main thread) or the
/// interpreter is exiting. A stopped call raises KeyboardInterrupt (or RuntimeError at exit)
/// instead of returning its incomplete result.
func interruptible<R>(_ body: (@escaping @Sendable () -> Bool) -> R) throws -> R {
    let isMain = mapet_interrupt_begin()
    let stop: @Sendable () -> Bool = { mapet_interrupt_pending(isMain) != 0 }
    let r = withoutGIL {
        defer { mapet_interrupt_body_done() }
        return body(stop)
    }
    let stopped = stop()
    mapet_interrupt_end()
    if stopped {
        if PyErr_CheckSignals() != 0 { throw PythonErrorSet() }   // KeyboardInterrupt (or the handler's own)
        if mapet_shutdown_requested() != 0 { throw PyError.runtime("interrupted: the interpreter is exiting") }
        // A SIGINT whose handler raised nothing (e.g. signal.signal(SIGINT, lambda *a: None)).
        throw PyError.runtime("interrupted by SIGINT")
    }
    return r
}

// MARK: Handles: opaque Swift objects owned by Python (capsules)
//
// Thread safety: every handle carries one mutex. A call that touches the object's state
// (train steps, forward passes, releasing activations, optimizer updates, reseeding) runs
// through `exclusive(object) { ... }`: it releases the GIL first, then takes the object's
// mutex, so concurrent calls on one object from several Python threads run one after the
// other (never interleaved, never an "in use" error), while calls on different objects
// still run in parallel. The mutex is only ever waited for without the GIL, so a thread
// holding it can always get the GIL back: no deadlock.

let handleName: UnsafePointer<CChar> = UnsafePointer(strdup("mapet.handle")!)

/// The mutex of one native object (see `exclusive`).
final class ObjectLock {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    var handles = 1
    init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }
    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }
    func lock() { pthread_mutex_lock(mutex) }
    func unlock() { pthread_mutex_unlock(mutex) }
}

/// object → its lock, for every object behind a live handle (guarded by `lockTableMutex`).
nonisolated(unsafe) private var lockTable: [ObjectIdentifier: ObjectLock] = [:]
nonisolated(unsafe) private let lockTableMutex: UnsafeMutablePointer<pthread_mutex_t> = {
    let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    pthread_mutex_init(m, nil)
    return m
}()

private func withLockTable<R>(_ body: () -> R) -> R {
    pthread_mutex_lock(lockTableMutex)
    defer { pthread_mutex_unlock(lockTableMutex) }
    return body()
}

/// The lock of `object` (one is made for objects that never had a handle).
func objectLock(_ object: AnyObject) -> ObjectLock {
    withLockTable {
        let id = ObjectIdentifier(object)
        if let l = lockTable[id] { return l }
        let l = ObjectLock()
        l.handles = 0
        lockTable[id] = l
        return l
    }
}

/// Runs `body` with the GIL released and `object`'s mutex held. `body` must not touch Python objects.
func exclusive<R>(_ object: AnyObject, _ body: () throws -> R) rethrows -> R {
    let lock = objectLock(object)
    return try withoutGIL {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }
}

func makeHandle(_ object: AnyObject) -> PyObj? {
    withLockTable {
        let id = ObjectIdentifier(object)
        if let l = lockTable[id] { l.handles += 1 } else { lockTable[id] = ObjectLock() }
    }
    let p = Unmanaged.passRetained(object).toOpaque()
    return PyCapsule_New(p, handleName) { capsule in
        guard let capsule, let p = PyCapsule_GetPointer(capsule, handleName) else { return }
        let object = Unmanaged<AnyObject>.fromOpaque(p)
        withLockTable {
            let id = ObjectIdentifier(object.takeUnretainedValue())
            if let l = lockTable[id] {
                l.handles -= 1
                if l.handles <= 0 { lockTable[id] = nil }
            }
        }
        object.release()
    }
}
