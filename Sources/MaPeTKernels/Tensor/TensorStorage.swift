#if canImport(Glibc)
import Glibc
#endif

/// Element types mapet stores. Raw values are the Python buffer-protocol format characters.
public enum DType: String, Sendable {
    case float32 = "f"
    case int32 = "i"
    case int64 = "q"

    public var size: Int {
        switch self {
        case .float32, .int32: return 4
        case .int64: return 8
        }
    }
}

/// A Swift-owned, 64-byte aligned block of memory. Tensors, parameter blocks, gradient
/// blocks and optimizer moments all live in one of these; Python sees them through
/// zero-copy buffer views that retain the storage.
public final class TensorStorage: @unchecked Sendable {
    public let raw: UnsafeMutableRawPointer
    public let byteCount: Int

    /// Allocates `byteCount` zeroed bytes; returns nil when the allocation fails.
    public init?(byteCount: Int) {
        precondition(byteCount >= 0)
        var p: UnsafeMutableRawPointer? = nil
        guard posix_memalign(&p, 64, max(byteCount, 64)) == 0, let p else { return nil }
        memset(p, 0, max(byteCount, 64))
        self.raw = p
        self.byteCount = byteCount
        TensorStorage.liveCount.increment()
    }

    public convenience init?(count: Int, dtype: DType) {
        let (bytes, overflow) = count.multipliedReportingOverflow(by: dtype.size)
        guard !overflow else { return nil }
        self.init(byteCount: bytes)
    }

    deinit {
        free(raw)
        TensorStorage.liveCount.decrement()
    }

    public var floats: UnsafeMutablePointer<Float> { raw.assumingMemoryBound(to: Float.self) }

    /// Storages alive right now (a leak check for tests).
    public static let liveCount = Counter()
}

/// A lock-protected integer counter.
public final class Counter: @unchecked Sendable {
    private var value = 0
    private var lock = pthread_mutex_t()
    public init() { pthread_mutex_init(&lock, nil) }
    public func increment() { pthread_mutex_lock(&lock); value += 1; pthread_mutex_unlock(&lock) }
    public func decrement() { pthread_mutex_lock(&lock); value -= 1; pthread_mutex_unlock(&lock) }
    public var current: Int { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return value }
}
