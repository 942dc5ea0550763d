// Creating Swift-owned tensors and inspecting buffers handed in from Python.
import CPythonBridge
import MaPeTKernels

/// Largest allocation a single tensor may request (bytes): a typo'd shape should raise,
/// not exhaust the machine.
let maxTensorBytes = 1 << 40

func checkedCount(_ shape: [Int], _ name: String, itemSize: Int) throws -> Int {
    var count = 1
    for d in shape {
        guard d >= 0 else { throw PyError.value("\(name): dimensions must be ≥ 0, got \(shape)") }
        let (c, o) = count.multipliedReportingOverflow(by: d)
        guard !o, c <= maxTensorBytes / itemSize else {
            throw PyError.value("\(name): shape \(shape) is too large (limit \(maxTensorBytes) bytes)")
        }
        count = c
    }
    return count
}

let tensorMethods: [Method] = [
    Method("tensor_empty", { args in
        try args.expect(2)
        let shape = try args.ints(0, "shape")
        guard shape.count <= 8 else { throw PyError.value("shape: at most 8 dimensions, got \(shape.count)") }
        let dtypeName = try args.string(1, "dtype")
        let dtype: DType
        switch dtypeName {
        case "float32": dtype = .float32
        case "int32": dtype = .int32
        case "int64": dtype = .int64
        default: throw PyError.value("dtype: expected 'float32', 'int32' or 'int64', got '\(dtypeName)'")
        }
        let count = try checkedCount(shape, "shape", itemSize: dtype.size)
        guard let storage = TensorStorage(count: count, dtype: dtype) else {
            throw PyError.memory("tensor_empty: could not allocate \(count * dtype.size) bytes")
        }
        return try makeTensor(storage, dtype: dtype, shape: shape)
    }, doc: "tensor_empty(shape, dtype) -> Tensor: zero-filled Swift-owned storage."),

    Method("fill_", { args in
        try args.expect(2)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[0], "x", [nil], writable: true)
        let v = Float(try args.double(1, "value"))
        nonisolated(unsafe) let p = x.pointer
        withoutGIL { p.update(repeating: v, count: x.count) }
        return none()
    }, doc: "fill_(x, value): writes value into every element of the 1-d float32 buffer x, in place."),

    Method("buffer_address", { args in
        try args.expect(1)
        let arena = BufferArena(); defer { arena.release() }
        let x = try arena.float32(args[0], "x", [nil])
        return pyInt(Int(bitPattern: x.pointer))
    }, doc: "buffer_address(x) -> int: the address Swift sees for a 1-d float32 buffer (zero-copy checks)."),
]
