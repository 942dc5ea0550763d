import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The kernel classes a step's time is attributed to (`mapet.profile()`), plus the two spans the
/// extension measures around them: whole extension calls and their GIL-released part.
public enum KernelClass: Int, CaseIterable, Sendable {
    case gemm, attention, norms, elementwise, loss, optimizer
    /// Whole extension calls (argument checks, conversions and the native work).
    case extensionCall
    /// The GIL-released part of extension calls (the native work).
    case native

    public var name: String {
        switch self {
        case .gemm: "gemm"
        case .attention: "attention"
        case .norms: "norms"
        case .elementwise: "elementwise"
        case .loss: "loss"
        case .optimizer: "optimizer"
        case .extensionCall: "extension_call"
        case .native: "native"
        }
    }
}

/// Process-wide time accounting per `KernelClass`, off unless a profile is running. A kernel
/// entry point brackets itself with `let t = Profiler.begin()` … `defer { Profiler.end(.cls, t) }`;
/// only entry points called from the model's own thread are bracketed (never their parallel
/// workers' inner calls), and a bracket inside another on the same thread (a linear layer that
/// runs GELU, or calls itself for the product) counts nothing: no time is counted twice. The two
/// spans around extension calls use `beginSpan`/`endSpan`, which contain kernel brackets. Off,
/// the cost is one relaxed atomic load.
public enum Profiler {
    private static let on = Atomic<Bool>(false)
    private static let totals = Mutex<[UInt64]>(Array(repeating: 0, count: 2 * KernelClass.allCases.count))
    /// This thread's depth of open kernel brackets.
    private static let depth: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key, nil)
        return key
    }()
    /// `begin`'s stamp for a bracket inside another (clock() is never 1).
    private static let nested: UInt64 = 1

    @inline(__always) static func clock() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    /// A kernel bracket's start stamp: 0 when profiling is off, `nested` inside another bracket
    /// of this thread.
    @inline(__always) public static func begin() -> UInt64 {
        guard on.load(ordering: .relaxed) else { return 0 }
        let d = Int(bitPattern: pthread_getspecific(depth))
        pthread_setspecific(depth, UnsafeRawPointer(bitPattern: d + 1))
        return d == 0 ? clock() : nested
    }

    /// Closes a kernel bracket: adds the time since `start` (from `begin`) to `cls`, unless nested.
    @inline(__always) public static func end(_ cls: KernelClass, _ start: UInt64) {
        if start == 0 { return }
        pthread_setspecific(depth, UnsafeRawPointer(bitPattern: Int(bitPattern: pthread_getspecific(depth)) - 1))
        if start != nested { add(cls, since: start) }
    }

    /// A span's start stamp (extension calls and their native part), or 0 when profiling is off.
    @inline(__always) public static func beginSpan() -> UInt64 {
        on.load(ordering: .relaxed) ? clock() : 0
    }

    /// Adds the time since `start` (from `beginSpan`) to `cls`.
    @inline(__always) public static func endSpan(_ cls: KernelClass, _ start: UInt64) {
        if start != 0 { add(cls, since: start) }
    }

    private static func add(_ cls: KernelClass, since start: UInt64) {
        let dt = clock() &- start
        totals.withLock { t in
            t[2 * cls.rawValue] &+= dt
            t[2 * cls.rawValue + 1] &+= 1
        }
    }

    /// Clears the totals and starts (or stops) accounting.
    public static func reset(running: Bool) {
        totals.withLock { t in for i in t.indices { t[i] = 0 } }
        on.store(running, ordering: .relaxed)
    }

    /// Nanoseconds and calls per class, in `KernelClass` order.
    public static func snapshot() -> [(ns: UInt64, calls: UInt64)] {
        totals.withLock { t in KernelClass.allCases.map { (t[2 * $0.rawValue], t[2 * $0.rawValue + 1]) } }
    }
}
