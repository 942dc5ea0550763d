// The seeded source of MaPeT permutations. Its state is (seed, samplesDrawn): the next batch
// of B samples uses streams samplesDrawn ..< samplesDrawn + B (see Xoshiro256.swift), so a
// checkpoint that stores the two numbers resumes the exact sequence of permutations.

public final class PermutationSampler: @unchecked Sendable {
    /// N = num_patches + 1.
    public let tokens: Int
    public let leastNumber: Int
    public let upperLimit: Int?
    public private(set) var seed: UInt64
    public private(set) var samplesDrawn: UInt64

    public init(tokens: Int, leastNumber: Int, upperLimit: Int?, seed: UInt64) {
        precondition(tokens >= 2 && leastNumber >= 1 && leastNumber < tokens, "invalid sampler sizes")
        (self.tokens, self.leastNumber, self.upperLimit, self.seed, self.samplesDrawn) =
            (tokens, leastNumber, upperLimit, seed, 0)
    }

    /// Reserves the next B streams and returns the first. Callers serialise this (Python: under
    /// the GIL); the drawing itself (`draw`) may then run anywhere.
    public func reserve(_ B: Int) -> UInt64 {
        let first = samplesDrawn
        samplesDrawn &+= UInt64(B)
        return first
    }

    /// Draws the B samples of streams firstStream ..< firstStream + B (nil when memory runs out).
    public func draw(batchSize B: Int, firstStream: UInt64) -> PermutationBatch? {
        PermutationBatch.sample(batchSize: B, tokens: tokens, leastNumber: leastNumber,
                                upperLimit: upperLimit, seed: seed, firstStream: firstStream)
    }

    /// reserve + draw.
    public func sample(batchSize B: Int) -> PermutationBatch? {
        draw(batchSize: B, firstStream: reserve(B))
    }

    public func setState(seed: UInt64, samplesDrawn: UInt64) {
        self.seed = seed
        self.samplesDrawn = samplesDrawn
    }
}
