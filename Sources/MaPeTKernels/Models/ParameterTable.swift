// The size table that cuts one contiguous parameter block into named tensors (llm.c's
// `ParameterTensors`). Gradients and optimizer moments use the same table on their own
// blocks, so one offset names the same parameter in all of them.

public struct ParameterEntry: Sendable, Equatable {
    public let name: String
    public let shape: [Int]
    public let offset: Int
    public var count: Int { shape.reduce(1, *) }
}

public struct ParameterTable: Sendable {
    public private(set) var entries: [ParameterEntry] = []
    public private(set) var total = 0
    private var index: [String: Int] = [:]

    public init() {}

    /// Appends a tensor; returns its offset. Offsets are rounded up to 16 floats (64 bytes) so
    /// every tensor starts cache-line aligned.
    @discardableResult
    public mutating func add(_ name: String, _ shape: [Int]) -> Int {
        precondition(index[name] == nil, "duplicate parameter \(name)")
        let offset = (total + 15) / 16 * 16
        entries.append(ParameterEntry(name: name, shape: shape, offset: offset))
        index[name] = entries.count - 1
        total = offset + shape.reduce(1, *)
        return offset
    }

    public subscript(_ name: String) -> ParameterEntry? { index[name].map { entries[$0] } }

    public func offset(_ name: String) -> Int {
        guard let e = self[name] else { preconditionFailure("no parameter \(name)") }
        return e.offset
    }
}
