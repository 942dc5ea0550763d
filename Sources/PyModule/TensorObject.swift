// `mapet._core.Tensor`: a Python view of Swift-owned storage, exported through the
// buffer protocol, so `np.asarray(tensor)` is a zero-copy array that keeps the Swift
// storage alive for as long as any view of it lives.
import CPythonBridge
import MaPeTKernels

nonisolated(unsafe) var tensorType: PyObj? = nil

private let tensorDealloc: @convention(c) (PyObj?) -> Void = { obj in
    guard let obj else { return }
    let t = mapet_as_tensor(obj)!
    if let owner = t.pointee.owner { Unmanaged<TensorStorage>.fromOpaque(owner).release() }
    t.pointee.owner = nil
    mapet_tensor_free(obj)
}

private let tensorGetBuffer: @convention(c) (PyObj?, UnsafeMutablePointer<Py_buffer>?, Int32) -> Int32 = { obj, view, flags in
    guard let obj, let view else { return -1 }
    let t = mapet_as_tensor(obj)!
    if (flags & PyBUF_WRITABLE) == PyBUF_WRITABLE && t.pointee.readonly != 0 {
        mapet_set_error(mapet_exc_buffer_error(), "Tensor is read-only")
        return -1
    }
    let raw = UnsafeMutableRawPointer(t)
    let shape = (raw + MemoryLayout<MapetTensorObject>.offset(of: \.shape)!).assumingMemoryBound(to: Py_ssize_t.self)
    let strides = (raw + MemoryLayout<MapetTensorObject>.offset(of: \.strides)!).assumingMemoryBound(to: Py_ssize_t.self)
    let format = (raw + MemoryLayout<MapetTensorObject>.offset(of: \.format)!).assumingMemoryBound(to: CChar.self)
    var count = 1
    for d in 0..<t.pointee.ndim { count *= shape[d] }
    view.pointee.buf = t.pointee.data
    mapet_py_incref(obj)
    view.pointee.obj = obj
    view.pointee.len = count * t.pointee.itemsize
    view.pointee.itemsize = t.pointee.itemsize
    view.pointee.readonly = t.pointee.readonly
    view.pointee.ndim = Int32(t.pointee.ndim)
    view.pointee.format = (flags & PyBUF_FORMAT) != 0 ? format : nil
    view.pointee.shape = (flags & PyBUF_ND) == PyBUF_ND ? shape : nil
    view.pointee.strides = (flags & PyBUF_STRIDES) == PyBUF_STRIDES ? strides : nil
    view.pointee.suboffsets = nil
    view.pointee.internal = nil
    return 0
}

func registerTensorType(in module: PyObj) -> Bool {
    var slots: [PyType_Slot] = [
        PyType_Slot(slot: Py_tp_dealloc, pfunc: unsafeBitCast(tensorDealloc, to: UnsafeMutableRawPointer.self)),
        PyType_Slot(slot: Py_bf_getbuffer, pfunc: unsafeBitCast(tensorGetBuffer, to: UnsafeMutableRawPointer.self)),
        PyType_Slot(slot: Py_tp_doc, pfunc: UnsafeMutableRawPointer(mutating: tensorDoc)),
        PyType_Slot(slot: 0, pfunc: nil),
    ]
    let type: PyObj? = slots.withUnsafeMutableBufferPointer { s in
        var spec = PyType_Spec(name: tensorTypeName, basicsize: Int32(mapet_tensor_basicsize()),
                               itemsize: 0, flags: UInt32(mapet_tpflags_default()), slots: s.baseAddress)
        return PyType_FromSpec(&spec)
    }
    guard let type else { return false }
    tensorType = type
    mapet_py_incref(type)
    return PyModule_AddObject(module, "Tensor", type) == 0
}

private let tensorTypeName = UnsafePointer(strdup("mapet._core.Tensor")!)
private let tensorDoc = UnsafePointer(strdup("Swift-owned storage viewed through the buffer protocol: np.asarray(t) shares its memory.")!)

/// A Python Tensor viewing `shape` elements of `storage` from element `offset` on.
func makeTensor(_ storage: TensorStorage, dtype: DType, offset: Int = 0, shape: [Int], readonly: Bool = false) throws -> PyObj {
    guard shape.count <= Int(MAPET_TENSOR_MAX_DIMS) else { throw PyError.value("tensor: at most 8 dimensions") }
    let count = shape.reduce(1, *)
    precondition((offset + count) * dtype.size <= max(storage.byteCount, 0) || count == 0)
    guard let type = tensorType, let obj = mapet_type_alloc(type) else { throw PythonErrorSet() }
    let t = mapet_as_tensor(obj)!
    t.pointee.owner = Unmanaged.passRetained(storage).toOpaque()
    t.pointee.data = storage.raw + offset * dtype.size
    t.pointee.ndim = shape.count
    t.pointee.itemsize = dtype.size
    t.pointee.readonly = readonly ? 1 : 0
    withUnsafeMutableBytes(of: &t.pointee.shape) { s in
        withUnsafeMutableBytes(of: &t.pointee.strides) { st in
            var step = dtype.size
            for d in Swift.stride(from: shape.count - 1, through: 0, by: -1) {
                s.storeBytes(of: shape[d], toByteOffset: d * 8, as: Int.self)
                st.storeBytes(of: step, toByteOffset: d * 8, as: Int.self)
                step *= shape[d]
            }
        }
    }
    withUnsafeMutableBytes(of: &t.pointee.format) { f in
        f.storeBytes(of: dtype.rawValue.utf8.first!, toByteOffset: 0, as: UInt8.self)
        f.storeBytes(of: 0, toByteOffset: 1, as: UInt8.self)
    }
    return obj
}
