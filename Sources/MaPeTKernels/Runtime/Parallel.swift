import Dispatch
#if canImport(Glibc)
import Glibc
#endif
import CBLAS

/// mapet's one parallel strategy: OpenBLAS runs single-threaded and mapet splits work
/// (row blocks of a GEMM, batch × heads of attention, chunks of points in k-means) over
/// `Parallel.threadCount` Dispatch workers. BLAS calls therefore never nest inside a
/// multi-threaded BLAS. Every kernel cuts its work so that no element's reduction order depends
/// on `threadCount` (GEMM tiles are cut by `planWidth`, k-means by fixed blocks, attention by
/// batch × heads): results are bitwise the same for any thread count on a given machine.
public enum Parallel {
    nonisolated(unsafe) private static var _threads: Int = {
        scipy_openblas_set_num_threads(1)
        return max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    }()

    /// The processor count at start-up. Work that must come out bitwise the same for any
    /// `threadCount` (GEMM tiles) is cut by this, never by `threadCount`.
    public static let planWidth: Int = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))

    /// Number of worker threads used by mapet kernels.
    public static var threadCount: Int {
        get { _threads }
        set {
            precondition(newValue >= 1, "thread count must be ≥ 1")
            scipy_openblas_set_num_threads(1)
            _threads = newValue
        }
    }

    /// Runs `body(i)` for i in 0..<count on up to `threadCount` workers.
    @inlinable
    public static func forEach(_ count: Int, _ body: @Sendable (Int) -> Void) {
        if count <= 0 { return }
        if count == 1 || threadCount == 1 {
            for i in 0..<count { body(i) }
            return
        }
        let workers = min(count, threadCount)
        if workers == count {
            DispatchQueue.concurrentPerform(iterations: count, execute: body)
        } else {
            // Static round-robin assignment: the same items always run in the same order.
            DispatchQueue.concurrentPerform(iterations: workers) { w in
                var i = w
                while i < count { body(i); i += workers }
            }
        }
    }

    /// Splits 0..<count into at most `threadCount` contiguous ranges of at least `grain`
    /// items and runs `body` on each range.
    @inlinable
    public static func forRanges(_ count: Int, grain: Int = 1, _ body: @Sendable (Range<Int>) -> Void) {
        if count <= 0 { return }
        let parts = max(1, min(threadCount, count / max(grain, 1)))
        if parts == 1 { body(0..<count); return }
        DispatchQueue.concurrentPerform(iterations: parts) { p in
            let lo = count * p / parts, hi = count * (p + 1) / parts
            body(lo..<hi)
        }
    }
}
