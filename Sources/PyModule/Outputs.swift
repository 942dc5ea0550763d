// The outputs of a kernel call (mapet.ops): the caller's array where one is given, otherwise a
// new Swift-owned tensor of the shape the checked inputs imply. Python passes None and never
// reads a shape to size an output; this file is the one place that does.
import CPythonBridge
import MaPeTKernels

/// Collects a call's outputs in order. `float32(i, name, shape)` checks args[i] (writable,
/// C-contiguous, of `shape`) or, when it is None, allocates a zero-filled tensor of `shape` (the
/// backward kernels accumulate into it). `result()` hands them back: the one output, or a tuple
/// in order; the caller's own arrays come back as themselves. Take the outputs after every input
/// check, so that a refused call allocates nothing; what was taken before a later error is
/// released with the collector.
final class Outputs {
    private let arena: BufferArena
    private let args: Args
    private var objects: [PyObj] = []  // one new reference each

    init(_ arena: BufferArena, _ args: Args) {
        self.arena = arena
        self.args = args
    }

    deinit { for o in objects { mapet_py_decref(o) } }

    /// args[i] as a float32 output of `shape`, or a new tensor of that shape when it is None.
    func float32(_ i: Int, _ name: String, _ shape: [Int]) throws -> ArrayView<Float> {
        if !args.isNone(i) {
            let v = try arena.float32(args[i], name, shape, writable: true)
            keep(args[i])
            return v
        }
        return try fresh(name, shape)
    }

    /// args[i] as a 2-d float32 output whose rows may lie apart (a GEMM's C), with its row
    /// stride; a new [rows, cols] tensor (row stride cols) when it is None.
    func float32Rows(_ i: Int, _ name: String, _ shape: [Int]) throws -> (ArrayView<Float>, Int) {
        if !args.isNone(i) {
            let (v, ld) = try arena.float32Rows(args[i], name, shape, writable: true)
            keep(args[i])
            return (v, ld)
        }
        return (try fresh(name, shape), max(shape[1], 1))
    }

    /// An output a call produces only on request (a train step's logits): nil when args[i] is
    /// None or False, a new tensor of `shape` when it is True, otherwise args[i] checked as by
    /// `float32` (filled in place and returned).
    func requested(_ i: Int, _ name: String, _ shape: [Int]) throws -> ArrayView<Float>? {
        let o = args[i]
        if args.isNone(i) { return nil }
        if mapet_py_bool_check(o) != 0 { return try args.bool(i, name) ? try fresh(name, shape) : nil }
        return try float32(i, name, shape)
    }

    /// A new zero-filled tensor of `shape` (an output the caller never supplies).
    func new(_ name: String, _ shape: [Int]) throws -> ArrayView<Float> { try fresh(name, shape) }

    /// An output the call does not produce (None in the result).
    func absent() { objects.append(none()) }

    /// The outputs: the single one, or a tuple of all in the order they were taken, after
    /// `leading` (new references, e.g. a loss; nil where making one failed).
    func result(leading: [PyObj?] = []) throws -> PyObj {
        let items: [PyObj?] = leading + objects.map { $0 }
        objects = []
        if items.count == 1, let only = items[0] { return only }
        return try pyTuple(items)
    }

    private func keep(_ o: PyObj) {
        mapet_py_incref(o)
        objects.append(o)
    }

    private func fresh(_ name: String, _ shape: [Int]) throws -> ArrayView<Float> {
        guard shape.count <= Int(MAPET_TENSOR_MAX_DIMS) else {
            throw PyError.value("\(name): expected at most \(MAPET_TENSOR_MAX_DIMS) dimensions, got \(shape.count)")
        }
        let count = try checkedProduct(shape, name)
        try requireMemory(try checkedProduct([count, 4], name), "\(args.function): \(name) \(shape)")
        guard let storage = TensorStorage(count: count, dtype: .float32) else {
            throw PyError.memory("\(args.function): could not allocate \(name) (\(count) floats)")
        }
        objects.append(try makeTensor(storage, dtype: .float32, shape: shape))
        return ArrayView(pointer: storage.floats, shape: shape)  // alive while the tensor is
    }
}

extension Args {
    /// A shape: one int or a list/tuple of ints (anything with `__index__`, bools refused), each ≥ 0.
    func shape(_ i: Int, _ name: String) throws -> [Int] {
        let o = self[i]
        guard mapet_py_list_check(o) != 0 || mapet_py_tuple_check(o) != 0 else {
            return [try Args.index(o, name, min: 0)]
        }
        var dims: [Int] = []
        for k in 0..<PySequence_Size(o) {
            guard let item = PySequence_GetItem(o, k) else { throw PythonErrorSet() }
            defer { mapet_py_decref(item) }
            dims.append(try Args.index(item, "\(name)[\(k)]", min: 0))
        }
        return dims
    }
}
