// MaPeT permutation sampling, two-stream masks and BEiT block masks (mapet.sampling).
// Seeds and stream counters cross as signed 64-bit bit patterns (the facade converts).
import CPythonBridge
import MaPeTKernels

private func optionalInt(_ args: Args, _ i: Int, _ name: String, min: Int) throws -> Int? {
    args.isNone(i) ? nil : try args.int(i, name, min: min)
}

private func bits(_ args: Args, _ i: Int, _ name: String) throws -> UInt64 {
    UInt64(bitPattern: Int64(try args.int(i, name)))
}

private func pyBits(_ v: UInt64) -> PyObj? { pyInt(Int(Int64(bitPattern: v))) }

/// Checks (N, least_number, upper_limit) and returns them.
private func permutationSizes(_ args: Args, tokens: Int, _ l: Int, _ u: Int) throws -> (Int, Int?) {
    let L = try args.int(l, "least_number", min: 1)
    guard L < tokens else {
        throw PyError.value("least_number: expected 1 ≤ least_number ≤ N − 1 = \(tokens - 1) (N = num_patches + 1 = \(tokens)), got \(L)")
    }
    let upper = try optionalInt(args, u, "upper_limit", min: 0)
    if let upper, upper < L {
        throw PyError.value("upper_limit: expected None or an int ≥ least_number = \(L) (no predicted token would count in the loss), got \(upper)")
    }
    return (L, upper)
}

private func maskShape(_ batch: PermutationBatch, content: Bool, positional: Bool) -> (Int, Int) {
    let (N, P) = (batch.tokens, batch.predictedCount)
    let keys = positional ? N + P : N
    return (content ? keys : P, keys)
}

private func streamKind(_ args: Args, _ i: Int) throws -> Bool {
    let s = try args.string(i, "stream")
    guard s == "content" || s == "query" else {
        throw PyError.value("stream: expected 'content' or 'query', got '\(s)'")
    }
    return s == "content"
}

private func sampleIndex(_ args: Args, _ i: Int, _ batch: PermutationBatch) throws -> Int {
    let b = try args.int(i, "i")
    guard b >= 0 && b < batch.batchSize else {
        throw PyError(kind: .index, message: "i: sample index \(b) out of range for a batch of \(batch.batchSize)")
    }
    return b
}

let samplingMethods: [Method] = [
    // MARK: permutations

    Method("perm_sampler_new", { args in
        try args.expect(4)
        let N = try args.int(0, "num_patches", min: 1, max: 1 << 24) + 1
        let (L, upper) = try permutationSizes(args, tokens: N, 1, 2)
        let seed = try bits(args, 3, "seed")
        return makeHandle(PermutationSampler(tokens: N, leastNumber: L, upperLimit: upper, seed: seed))
    }, doc: "perm_sampler_new(num_patches, least_number, upper_limit|None, seed_bits) -> handle"),

    Method("perm_sampler_sample", { args in
        try args.expect(2)
        let sampler = try args.handle(0, "sampler", PermutationSampler.self)
        let B = try args.int(1, "batch_size", min: 1)
        _ = try checkedCount([B, sampler.tokens], "batch_size", itemSize: 32)
        let first = sampler.reserve(B)  // under the GIL: concurrent callers get disjoint streams
        guard let batch = exclusive(sampler, { sampler.draw(batchSize: B, firstStream: first) }) else {
            throw PyError.memory("sample: could not allocate a batch of \(B) permutations")
        }
        return makeHandle(batch)
    }, doc: "perm_sampler_sample(sampler, batch_size) -> batch handle"),

    Method("perm_sampler_state", { args in
        try args.expect(1)
        let s = try args.handle(0, "sampler", PermutationSampler.self)
        return try pyTuple([pyBits(s.seed), pyBits(s.samplesDrawn)])
    }, doc: "perm_sampler_state(sampler) -> (seed_bits, samples_drawn_bits)"),

    Method("perm_sampler_set_state", { args in
        try args.expect(3)
        let s = try args.handle(0, "sampler", PermutationSampler.self)
        let (seed, drawn) = (try bits(args, 1, "seed"), try bits(args, 2, "samples_drawn"))
        exclusive(s) { s.setState(seed: seed, samplesDrawn: drawn) }   // not while a draw reads the seed
        return none()
    }, doc: "perm_sampler_set_state(sampler, seed_bits, samples_drawn_bits)"),

    Method("perm_batch_from_orders", { args in
        try args.expect(3)
        let arena = BufferArena(); defer { arena.release() }
        let orders = try arena.int64(args[0], "orders", [nil, nil])
        let (B, N) = (orders.shape[0], orders.shape[1])
        guard B >= 1 else { throw PyError.value("orders: expected at least one row, got shape \(orders.shape)") }
        guard N >= 2 else { throw PyError.value("orders: expected rows of N ≥ 2 tokens (class token + patches), got shape \(orders.shape)") }
        let (L, upper) = try permutationSizes(args, tokens: N, 1, 2)
        nonisolated(unsafe) let p = orders.readOnly
        let result = withoutGIL {
            PermutationBatch.fromOrders(p, batchSize: B, tokens: N, leastNumber: L, upperLimit: upper)
        }
        switch result {
        case .failure(let e): throw PyError.value("orders: \(e.message)")
        case .success(nil): throw PyError.memory("from_orders: could not allocate a batch of \(B) permutations")
        case .success(let batch?): return makeHandle(batch)
        }
    }, doc: "perm_batch_from_orders(orders int64 [B, N], least_number, upper_limit|None) -> batch handle"),

    Method("perm_batch_info", { args in
        try args.expect(1)
        let b = try args.handle(0, "batch", PermutationBatch.self)
        return try pyTuple([pyInt(b.batchSize), pyInt(b.tokens), pyInt(b.leastNumber), pyInt(b.predictedCount),
                            b.upperLimit.map(pyInt) ?? none()])
    }, doc: "perm_batch_info(batch) -> (B, N, least_number, P, upper_limit|None)"),

    Method("perm_batch_arrays", { args in
        try args.expect(1)
        let b = try args.handle(0, "batch", PermutationBatch.self)
        let (B, N, P) = (b.batchSize, b.tokens, b.predictedCount)
        // Read-only: the masks are computed from these very tables.
        return try pyTuple([
            makeTensor(b.orders, dtype: .int64, shape: [B, N], readonly: true),
            makeTensor(b.ranks, dtype: .int64, shape: [B, N], readonly: true),
            makeTensor(b.predicted, dtype: .int64, shape: [B, P], readonly: true),
            makeTensor(b.predictedRanks, dtype: .int64, shape: [B, P], readonly: true),
        ])
    }, doc: "perm_batch_arrays(batch) -> (orders, ranks, predicted, predicted_ranks), read-only int64 Tensors"),

    Method("perm_batch_mask", { args in
        // perm_batch_mask(batch, stream, i, positional_tokens, out int32 [rows, keys])
        try args.expect(5)
        let batch = try args.handle(0, "batch", PermutationBatch.self)
        let content = try streamKind(args, 1)
        let i = try sampleIndex(args, 2, batch)
        let positional = try args.bool(3, "positional_tokens")
        let (rows, keys) = maskShape(batch, content: content, positional: positional)
        let arena = BufferArena(); defer { arena.release() }
        let out = try arena.int32(args[4], "out", [rows, keys], writable: true)
        nonisolated(unsafe) let p = out.pointer
        withoutGIL {
            if content {
                denseMask(TwoStreamContentMask(batch, positionalTokens: positional), batch: i, rows: rows, keys: keys, out: p)
            } else {
                denseMask(TwoStreamQueryMask(batch, positionalTokens: positional), batch: i, rows: rows, keys: keys, out: p)
            }
        }
        return none()
    }, doc: "perm_batch_mask(batch, 'content'|'query', i, positional_tokens, out int32 [rows, keys]): 1 = may attend"),

    Method("perm_batch_mask_any", { args in
        // perm_batch_mask_any(batch, stream, i, positional_tokens, q0, q1, k0, k1) -> bool
        try args.expect(8)
        let batch = try args.handle(0, "batch", PermutationBatch.self)
        let content = try streamKind(args, 1)
        let i = try sampleIndex(args, 2, batch)
        let positional = try args.bool(3, "positional_tokens")
        let (rows, keys) = maskShape(batch, content: content, positional: positional)
        let q0 = try args.int(4, "q0", min: 0, max: rows), q1 = try args.int(5, "q1", min: q0, max: rows)
        let k0 = try args.int(6, "k0", min: 0, max: keys), k1 = try args.int(7, "k1", min: k0, max: keys)
        let any = content
            ? TwoStreamContentMask(batch, positionalTokens: positional).anyAllowed(batch: i, queries: q0..<q1, keys: k0..<k1)
            : TwoStreamQueryMask(batch, positionalTokens: positional).anyAllowed(batch: i, queries: q0..<q1, keys: k0..<k1)
        return pyBool(any)
    }, doc: "perm_batch_mask_any(batch, stream, i, positional_tokens, q0, q1, k0, k1) -> the rule's anyAllowed"),

    // MARK: block masks

    Method("block_sampler_new", { args in
        // block_sampler_new(height, width, target, min, max, min_aspect, max_aspect, exact, seed_bits)
        try args.expect(9)
        let h = try args.int(0, "height", min: 1, max: 1 << 12), w = try args.int(1, "width", min: 1, max: 1 << 12)
        let t = try args.int(2, "num_masking_patches", min: 0)
        guard t <= h * w else {
            throw PyError.value("num_masking_patches: expected at most \(h)×\(w) = \(h * w) cells, got \(t)")
        }
        let lo = try args.int(3, "min_num_patches", min: 1, max: 1 << 24)
        let hi = try args.int(4, "max_num_patches", min: 1, max: 1 << 24)
        let minAspect = try args.finiteDouble(5, "min_aspect"), maxAspect = try args.finiteDouble(6, "max_aspect")
        guard minAspect >= 1e-12 else { throw PyError.value("min_aspect: expected a value in [1e-12, 1e12], got \(minAspect)") }
        guard maxAspect <= 1e12 else { throw PyError.value("max_aspect: expected a value in [1e-12, 1e12], got \(maxAspect)") }
        guard maxAspect >= minAspect else {
            throw PyError.value("max_aspect: expected ≥ min_aspect = \(minAspect), got \(maxAspect)")
        }
        let g = BlockMaskGenerator(height: h, width: w, target: t, minNumPatches: lo, maxNumPatches: hi,
                                   minAspect: minAspect, maxAspect: maxAspect, exact: try args.bool(7, "exact"))
        return makeHandle(BlockMaskSampler(g, seed: try bits(args, 8, "seed")))
    }, doc: "block_sampler_new(height, width, target, min, max, min_aspect, max_aspect, exact, seed_bits) -> handle"),

    Method("block_sampler_sample", { args in
        try args.expect(2)
        let s = try args.handle(0, "sampler", BlockMaskSampler.self)
        let arena = BufferArena(); defer { arena.release() }
        let out = try arena.int32(args[1], "out", [nil, s.generator.cells], writable: true)
        let B = out.shape[0]
        let first = s.reserve(B)
        let (g, seed) = (s.generator, s.seed)
        nonisolated(unsafe) let p = out.pointer
        withoutGIL { g.generate(batchSize: B, seed: seed, firstStream: first, out: p) }
        return none()
    }, doc: "block_sampler_sample(sampler, out int32 [B, cells]): the next B masks"),

    Method("block_sampler_sample_blocks", { args in
        try args.expect(2)
        let s = try args.handle(0, "sampler", BlockMaskSampler.self)
        let arena = BufferArena(); defer { arena.release() }
        let out = try arena.int32(args[1], "out", [s.generator.cells], writable: true)
        var rng = Xoshiro256StarStar(seed: s.seed, stream: s.reserve(1))
        var blocks: [MaskBlock] = []
        _ = s.generator.generate(&rng, out: out.pointer) { blocks.append($0) }
        return try pyList(blocks.map { b in
            try? pyTuple([pyInt(b.top), pyInt(b.left), pyInt(b.height), pyInt(b.width), pyInt(b.budget)])
        })
    }, doc: "block_sampler_sample_blocks(sampler, out int32 [cells]) -> [(top, left, h, w, budget)]: the next mask and its blocks"),

    Method("block_sampler_state", { args in
        try args.expect(1)
        let s = try args.handle(0, "sampler", BlockMaskSampler.self)
        return try pyTuple([pyBits(s.seed), pyBits(s.samplesDrawn)])
    }, doc: "block_sampler_state(sampler) -> (seed_bits, samples_drawn_bits)"),

    Method("block_sampler_set_state", { args in
        try args.expect(3)
        let s = try args.handle(0, "sampler", BlockMaskSampler.self)
        s.setState(seed: try bits(args, 1, "seed"), samplesDrawn: try bits(args, 2, "samples_drawn"))
        return none()
    }, doc: "block_sampler_set_state(sampler, seed_bits, samples_drawn_bits)"),
]
