// Borrowing NumPy (any buffer-protocol) arrays without copying, with validation of
// dtype, ndim, shape and contiguity that names the argument on failure.
import CPythonBridge
import MaPeTKernels
#if canImport(Glibc)
import Glibc
#endif

/// A validated, C-contiguous view of a Python buffer.
struct ArrayView<T> {
    let pointer: UnsafeMutablePointer<T>
    let shape: [Int]
    var count: Int { shape.reduce(1, *) }
    var readOnly: UnsafePointer<T> { UnsafePointer(pointer) }
}

/// Holds the Py_buffer views taken during one call; `release()` (with the GIL held)
/// gives them back. Use as `let arena = BufferArena(); defer { arena.release() }`.
///
/// Read-only integer arrays (labels, tokens, masks, ids, memberships) are copied into
/// private storage while the GIL is held: the checks made on them (ranges, counts) then
/// still hold when the engine reads them after releasing the GIL, whatever another
/// Python thread writes into the caller's array meanwhile. Float inputs are borrowed:
/// a concurrent write can only change the numbers, never an index.
final class BufferArena {
    private var views: [UnsafeMutablePointer<Py_buffer>] = []
    private var copies: [UnsafeMutableRawPointer] = []

    func release() {
        for v in views {
            PyBuffer_Release(v)
            v.deallocate()
        }
        views.removeAll()
        for c in copies { free(c) }
        copies.removeAll()
    }

    deinit { release() }

    /// Borrows `obj` as a float32 array. `shape` entries that are nil accept any extent.
    func float32(_ obj: PyObj, _ name: String, _ shape: [Int?], writable: Bool = false) throws -> ArrayView<Float> {
        try view(obj, name, shape, writable: writable, dtype: .float32)
    }

    /// Borrows `obj` as a C-contiguous float32 array of any shape (elementwise kernels).
    func float32AnyShape(_ obj: PyObj, _ name: String) throws -> ArrayView<Float> {
        try view(obj, name, nil, writable: false, dtype: .float32)
    }

    /// Borrows `obj` as an int32 array; a read-only one is a private copy (see the type's note).
    func int32(_ obj: PyObj, _ name: String, _ shape: [Int?], writable: Bool = false) throws -> ArrayView<Int32> {
        let v: ArrayView<Int32> = try view(obj, name, shape, writable: writable, dtype: .int32)
        return writable ? v : try privateCopy(v, name)
    }

    /// `int32` of any shape (the caller compares the whole shape and words the error).
    func int32AnyShape(_ obj: PyObj, _ name: String) throws -> ArrayView<Int32> {
        let v: ArrayView<Int32> = try view(obj, name, nil, writable: false, dtype: .int32)
        return try privateCopy(v, name)
    }

    func int64(_ obj: PyObj, _ name: String, _ shape: [Int?], writable: Bool = false) throws -> ArrayView<Int64> {
        let v: ArrayView<Int64> = try view(obj, name, shape, writable: writable, dtype: .int64)
        return writable ? v : try privateCopy(v, name)
    }

    private func privateCopy<T>(_ v: ArrayView<T>, _ name: String) throws -> ArrayView<T> {
        let bytes = v.count * MemoryLayout<T>.stride
        guard let p = malloc(Swift.max(bytes, 64)) else {
            throw PyError.memory("\(name): could not allocate \(bytes) bytes for a private copy")
        }
        copies.append(p)
        p.copyMemory(from: v.pointer, byteCount: bytes)
        return ArrayView(pointer: p.assumingMemoryBound(to: T.self), shape: v.shape)
    }

    /// Borrows a 2-d float32 array whose rows may lie apart (e.g. a column slice `x[:, :k]` of a
    /// C-contiguous array): unit stride along a row, any row stride ≥ the row. Returns the view
    /// and the row stride in elements (the `ld` of BLAS).
    func float32Rows(_ obj: PyObj, _ name: String, _ shape: [Int?], writable: Bool = false) throws -> (ArrayView<Float>, Int) {
        var ld = 0
        let v: ArrayView<Float> = try view(obj, name, shape, writable: writable, dtype: .float32, rowStride: &ld)
        return (v, ld)
    }

    private func view<T>(_ obj: PyObj, _ name: String, _ shape: [Int?]?, writable: Bool, dtype: DType) throws -> ArrayView<T> {
        var unused = 0
        return try view(obj, name, shape, writable: writable, dtype: dtype, rowStride: &unused, strided: false)
    }

    /// `strided`: a 2-d array whose rows are contiguous but spaced `rowStride` elements apart
    /// is accepted (rowStride ≥ the row length, a whole number of elements).
    /// `shape` nil: any number of dimensions.
    private func view<T>(_ obj: PyObj, _ name: String, _ shape: [Int?]?, writable: Bool, dtype: DType,
                         rowStride: inout Int, strided: Bool = true) throws -> ArrayView<T> {
        let expected = shape.map { "a \(dtype.numpyName) array of shape \(describe($0))" } ?? "a \(dtype.numpyName) array"
        if mapet_py_is_none(obj) != 0 { throw PyError.type("\(name): expected \(expected), got None") }
        let v = UnsafeMutablePointer<Py_buffer>.allocate(capacity: 1)
        let flags = PyBUF_STRIDES | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)
        guard PyObject_GetBuffer(obj, v, flags) == 0 else {
            PyErr_Clear()
            v.deallocate()
            if writable, PyObject_CheckBuffer(obj) != 0 {
                throw PyError.value("\(name): expected a writable array, got a read-only \(typeName(obj))")
            }
            throw PyError.type("\(name): expected \(expected), got \(typeName(obj))")
        }
        views.append(v)
        let b = v.pointee
        let fmt = b.format.map { String(cString: $0) } ?? "B"
        guard let kind = DType.fromFormat(fmt, itemSize: b.itemsize), kind == dtype else {
            throw PyError.type("\(name): expected \(expected), got dtype \(numpyName(format: fmt, itemSize: b.itemsize))")
        }
        let ndim = Int(b.ndim)
        var actual: [Int] = []
        for d in 0..<ndim { actual.append(b.shape![d]) }
        let shape = shape ?? actual.map { $0 }
        guard ndim == shape.count else {
            throw PyError.value("\(name): expected \(expected), got \(ndim)-d array of shape \(actual)")
        }
        for (d, want) in shape.enumerated() where want != nil && want! != actual[d] {
            throw PyError.value("\(name): expected \(expected), got shape \(actual)")
        }
        if strided && ndim == 2 {
            let rows = actual[0], cols = actual[1], s0 = b.strides![0], s1 = b.strides![1]
            guard cols <= 1 || s1 == b.itemsize else {
                throw PyError.value("\(name): expected rows with unit stride, got strides \([s0, s1]) for shape \(actual) (use np.ascontiguousarray)")
            }
            if rows <= 1 || cols == 0 {
                rowStride = max(cols, 1)
            } else {
                guard s0 % b.itemsize == 0, s0 / b.itemsize >= max(cols, 1) else {
                    throw PyError.value("\(name): expected a row stride ≥ the row (\(cols) elements), got strides \([s0, s1]) for shape \(actual) (use np.ascontiguousarray)")
                }
                rowStride = s0 / b.itemsize
            }
            let count = rows * cols
            if count > 0 && b.buf == nil { throw PyError.value("\(name): buffer has no data") }
            let ptr = b.buf ?? UnsafeMutableRawPointer(mutating: emptyStorage)
            return ArrayView(pointer: ptr.assumingMemoryBound(to: T.self), shape: actual)
        }
        // C-contiguity (extent-1 dimensions may carry any stride; an empty array has no layout).
        var expectedStride = b.itemsize
        let empty = actual.contains(0)
        for d in Swift.stride(from: ndim - 1, through: 0, by: -1) where actual[d] > 1 && !empty {
            guard b.strides![d] == expectedStride else {
                throw PyError.value("\(name): expected a C-contiguous array, got strides \((0..<ndim).map { b.strides![$0] }) for shape \(actual) (use np.ascontiguousarray)")
            }
            expectedStride *= actual[d]
        }
        let count = try checkedProduct(actual, name)
        if count > 0 && b.buf == nil { throw PyError.value("\(name): buffer has no data") }
        // An empty array may have no storage at all; hand kernels a valid dummy pointer.
        let ptr = b.buf ?? UnsafeMutableRawPointer(mutating: emptyStorage)
        return ArrayView(pointer: ptr.assumingMemoryBound(to: T.self), shape: actual)
    }
}

private let emptyStorage = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)

private func describe(_ shape: [Int?]) -> String {
    "[" + shape.map { $0.map(String.init) ?? "*" }.joined(separator: ", ") + "]"
}

extension DType {
    var numpyName: String {
        switch self {
        case .float32: return "float32"
        case .int32: return "int32"
        case .int64: return "int64"
        }
    }

    /// Parses a struct-module format ("f", "<f", "=i", "l", …) in native byte order.
    static func fromFormat(_ format: String, itemSize: Int) -> DType? {
        var f = Substring(format)
        if let c = f.first, "@=<".contains(c) { f = f.dropFirst() }
        guard f.count == 1, let c = f.first else { return nil }
        switch (c, itemSize) {
        case ("f", 4): return .float32
        case ("i", 4), ("l", 4): return .int32
        case ("q", 8), ("l", 8): return .int64
        default: return nil
        }
    }
}

private func numpyName(format: String, itemSize: Int) -> String {
    var f = Substring(format)
    if let c = f.first, "@=<>!".contains(c) { f = f.dropFirst() }
    let signed = "bhilq", unsigned = "BHILQ"
    if let c = f.first, f.count == 1 {
        if c == "f" || c == "d" || c == "e" { return "float\(itemSize * 8)" }
        if signed.contains(c) { return "int\(itemSize * 8)" }
        if unsigned.contains(c) { return "uint\(itemSize * 8)" }
        if c == "?" { return "bool" }
    }
    return "format '\(format)' (itemsize \(itemSize))"
}
