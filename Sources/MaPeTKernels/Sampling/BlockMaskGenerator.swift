// Block-wise masking for MIM (BEiT, Bao et al. 2022, §2.5; exact count as in BEiT v2's
// masking generator), ALGORITHMS.md §2 "Block-wise masking".
//
// On a height × width grid, until `target` cells are masked:
//   budget = min(target − masked, maxNumPatches)
//   up to 10 tries: area ~ U(minNumPatches, budget), aspect = exp(U(log minAspect, log maxAspect)),
//     h = round(√(area·aspect)), w = round(√(area/aspect)); if h < height and w < width, pick a
//     top-left uniformly and accept the block if it masks 0 < new ≤ budget cells; stop trying
//     at the first block that masked something.
//   stop when a round of tries masked nothing.
// With `exact`, the shortfall is then filled with cells drawn uniformly without replacement from
// the unmasked ones (the rounds never overshoot, since a block may add at most `budget`).
// round() is half-to-even, as Python's round; U(a, b) = a + (b − a)·u also when b < a.
#if canImport(Glibc)
import Glibc
#endif

/// One accepted block (for inspection and tests).
public struct MaskBlock: Sendable, Equatable {
    public let top: Int, left: Int, height: Int, width: Int
    /// The budget in force when the block was drawn.
    public let budget: Int
}

public struct BlockMaskGenerator: Sendable {
    public let height: Int, width: Int
    public let target: Int
    public let minNumPatches: Int, maxNumPatches: Int
    public let minAspect: Double, maxAspect: Double
    public let exact: Bool

    public init(height: Int, width: Int, target: Int, minNumPatches: Int, maxNumPatches: Int,
                minAspect: Double, maxAspect: Double, exact: Bool) {
        precondition(height >= 1 && width >= 1 && target >= 0 && target <= height * width)
        precondition(minNumPatches >= 1 && maxNumPatches >= 1 && minAspect > 0 && maxAspect >= minAspect)
        (self.height, self.width, self.target) = (height, width, target)
        (self.minNumPatches, self.maxNumPatches) = (minNumPatches, maxNumPatches)
        (self.minAspect, self.maxAspect, self.exact) = (minAspect, maxAspect, exact)
    }

    public var cells: Int { height * width }

    /// Writes one mask (1 = masked) into out[height·width] from `rng`; returns the masked count.
    /// `onBlock` sees every accepted block.
    public func generate(_ rng: inout Xoshiro256StarStar, out: UnsafeMutablePointer<Int32>,
                         onBlock: ((MaskBlock) -> Void)? = nil) -> Int {
        out.update(repeating: 0, count: cells)
        let logLo = log(minAspect), logHi = log(maxAspect)
        var masked = 0
        while masked < target {
            let budget = min(target - masked, maxNumPatches)
            var delta = 0
            for _ in 0..<10 {
                let area = rng.uniform(Double(minNumPatches), Double(budget))
                let aspect = exp(rng.uniform(logLo, logHi))
                let hd = (area * aspect).squareRoot().rounded(.toNearestOrEven)
                let wd = (area / aspect).squareRoot().rounded(.toNearestOrEven)
                // Compared as doubles: an extreme aspect gives sides beyond Int's range (or inf/NaN).
                guard hd >= 0 && hd < Double(height) && wd >= 0 && wd < Double(width) else { continue }
                let h = Int(hd), w = Int(wd)
                let top = rng.below(height - h + 1), left = rng.below(width - w + 1)
                var already = 0
                for i in top..<(top + h) { for j in left..<(left + w) { already += Int(out[i * width + j]) } }
                let new = h * w - already
                if new > 0 && new <= budget {
                    for i in top..<(top + h) { for j in left..<(left + w) { out[i * width + j] = 1 } }
                    delta += new
                    onBlock?(MaskBlock(top: top, left: left, height: h, width: w, budget: budget))
                }
                if delta > 0 { break }
            }
            if delta == 0 { break }
            masked += delta
        }
        if exact && masked < target {
            // Partial Fisher–Yates over the unmasked cells: the first `target − masked` picks.
            var free: [Int] = []
            free.reserveCapacity(cells - masked)
            for k in 0..<cells where out[k] == 0 { free.append(k) }
            for k in 0..<(target - masked) {
                let pick = k + rng.below(free.count - k)
                free.swapAt(k, pick)
                out[free[k]] = 1
            }
            masked = target
        }
        return masked
    }

    /// B masks into out[B, height·width]; mask b uses stream firstStream + b of `seed`.
    public func generate(batchSize B: Int, seed: UInt64, firstStream: UInt64, out: UnsafeMutablePointer<Int32>) {
        nonisolated(unsafe) let out = out
        let cells = self.cells, generator = self
        Parallel.forRanges(B, grain: 32) { rows in
            for b in rows {
                var rng = Xoshiro256StarStar(seed: seed, stream: firstStream &+ UInt64(b))
                _ = generator.generate(&rng, out: out + b * cells)
            }
        }
    }
}

/// A BlockMaskGenerator with its stream counter: state (seed, samplesDrawn) as for permutations.
public final class BlockMaskSampler: @unchecked Sendable {
    public let generator: BlockMaskGenerator
    public private(set) var seed: UInt64
    public private(set) var samplesDrawn: UInt64

    public init(_ generator: BlockMaskGenerator, seed: UInt64) {
        self.generator = generator
        self.seed = seed
        self.samplesDrawn = 0
    }

    /// Reserves the next B streams and returns the first (callers serialise this).
    public func reserve(_ B: Int) -> UInt64 {
        let first = samplesDrawn
        samplesDrawn &+= UInt64(B)
        return first
    }

    public func setState(seed: UInt64, samplesDrawn: UInt64) {
        self.seed = seed
        self.samplesDrawn = samplesDrawn
    }
}
