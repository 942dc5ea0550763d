// Size arithmetic at the boundary: products checked for overflow, memory needs compared with
// what the machine has before anything is allocated. The kernels build with -Ounchecked, so
// an overflow here would be undefined behaviour there; every size the engine derives from an
// argument is checked on this side first.
import CPythonBridge
import MaPeTKernels
#if canImport(Glibc)
import Glibc
#endif

/// Bytes of physical memory (the ceiling for any single request).
let physicalMemory: Int = {
    let pages = sysconf(Int32(_SC_PHYS_PAGES)), size = sysconf(Int32(_SC_PAGESIZE))
    return pages > 0 && size > 0 ? pages.multipliedReportingOverflow(by: size).partialValue : Int.max
}()

/// `xs` multiplied, or nil when the product does not fit in an Int (or a factor is negative).
func product(_ xs: [Int]) -> Int? {
    var p = 1
    for x in xs {
        guard x >= 0 else { return nil }
        let (r, o) = p.multipliedReportingOverflow(by: x)
        if o { return nil }
        p = r
    }
    return p
}

/// `xs` added, or nil on overflow.
func sum(_ xs: [Int]) -> Int? {
    var s = 0
    for x in xs {
        let (r, o) = s.addingReportingOverflow(x)
        if o { return nil }
        s = r
    }
    return s
}

/// `xs` multiplied, or a ValueError naming `name` when the product overflows.
func checkedProduct(_ xs: [Int], _ name: String) throws -> Int {
    guard let p = product(xs) else { throw PyError.value("\(name): the size \(xs.map(String.init).joined(separator: "·")) does not fit in 64 bits") }
    return p
}

func describeBytes(_ b: Int) -> String {
    let gb = Double(b) / Double(1 << 30)
    return gb >= 0.1 ? "\(b) bytes (\((gb * 10).rounded() / 10) GiB)" : "\(b) bytes"
}

/// Refuses (MemoryError) a request of `bytes` (nil: it overflows) that is larger than the
/// machine's memory or that the allocator refuses right now (address-space limit, overcommit
/// policy). The probe is freed at once; the engine then allocates for real.
func requireMemory(_ bytes: Int?, _ what: String, probe: Bool = true) throws {
    guard let bytes else { throw PyError.memory("\(what) would need more than 2^63 bytes") }
    guard bytes <= physicalMemory else {
        throw PyError.memory("\(what) would need \(describeBytes(bytes)); this machine has \(describeBytes(physicalMemory))")
    }
    guard probe, bytes > 1 << 24 else { return }
    // mmap as malloc does for large blocks (same address-space limit and overcommit checks; the
    // pages are never touched). A malloc/free pair would be optimised away.
    let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    guard let p, p != MAP_FAILED else {
        throw PyError.memory("\(what) would need \(describeBytes(bytes)), which cannot be allocated now")
    }
    munmap(p, bytes)
}

/// Floats one image needs for a training step of a ViT encoder of `k` with `streams` token
/// streams and an output of `outputs` values per token (an upper estimate of what the
/// models' arenas take: per block the LayerNorm/attention/MLP caches and the attention
/// probabilities H·N·N).
func activationFloatsPerImage(_ k: ViTConfig, streams: Int = 1, outputs: Int) -> Int? {
    let N = k.sequenceLength
    guard let attn = product([k.numHeads, N, N, 2]),
          let perRow = sum([product([12, k.embedDim]) ?? -1, product([3, k.hidden]) ?? -1, 16]),
          perRow > 0,
          let rows = product([N, perRow]),
          let block = sum([attn, rows]),
          let blocks = product([block, streams, k.depth + 1]),
          let head = product([N, outputs, 3]),
          let patches = product([N, k.patchDim, 2])
    else { return nil }
    return sum([blocks, head, patches])
}

/// Refuses a model whose parameters and gradients (`total` floats each), or whose training
/// activations for one image, cannot fit in this machine's memory.
func requireModelFits(_ k: ViTConfig, total: Int, outputs: Int, streams: Int = 1) throws {
    try requireMemory(product([total, 8]), "the model's parameters and gradients (\(total) parameters)")
    guard let perImage = activationFloatsPerImage(k, streams: streams, outputs: outputs),
          let bytes = product([perImage, 4]), bytes <= physicalMemory else {
        let b = activationFloatsPerImage(k, streams: streams, outputs: outputs).flatMap { product([$0, 4]) }
        throw PyError.memory("the model's activations for one image (\(k.sequenceLength) tokens, depth \(k.depth)) would need "
            + (b.map(describeBytes) ?? "more than 2^63 bytes") + "; this machine has \(describeBytes(physicalMemory))")
    }
}

/// Refuses a batch of `B` images whose activations cannot fit (before the engine allocates them).
func requireBatchFits(_ k: ViTConfig, B: Int, outputs: Int, streams: Int = 1) throws {
    let bytes = activationFloatsPerImage(k, streams: streams, outputs: outputs).flatMap { product([$0, B, 4]) }
    try requireMemory(bytes, "the activations of a batch of \(B) images", probe: false)
}
