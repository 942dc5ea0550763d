// Threads, BLAS information and diagnostics.
import CPythonBridge
import CBLAS
import MaPeTKernels

let runtimeMethods: [Method] = [
    Method("set_num_threads", { args in
        try args.expect(1)
        Parallel.threadCount = try args.int(0, "n", min: 1, max: 1024)
        return none()
    }, doc: "set_num_threads(n): worker threads for mapet kernels (OpenBLAS itself stays at 1)."),

    Method("get_num_threads", { args in
        try args.expect(0)
        return pyInt(Parallel.threadCount)
    }, doc: "get_num_threads() -> int"),

    Method("blas_info", { args in
        try args.expect(0)
        let config = scipy_openblas_get_config().map { String(cString: $0) } ?? "?"
        let core = scipy_openblas_get_corename().map { String(cString: $0) } ?? "?"
        return try pyTuple([pyString(config), pyString(core), pyInt(Int(scipy_openblas_get_num_threads()))])
    }, doc: "blas_info() -> (config, corename, blas_threads)"),

    Method("request_shutdown", { args in
        try args.expect(1)
        let timeout = try args.finiteDouble(0, "timeout")
        mapet_request_shutdown(max(0, timeout))   // keeps the GIL (see bridge.c)
        return none()
    }, doc: "request_shutdown(timeout): stops interruptible native calls (k-means) at their next chunk and waits up to timeout seconds for them; registered with atexit."),

    Method("profile_reset", { args in
        try args.expect(1)
        Profiler.reset(running: try args.bool(0, "running"))
        return none()
    }, doc: "profile_reset(running): clears the per-kernel-class times and starts/stops accounting."),

    Method("profile_snapshot", { args in
        try args.expect(0)
        return try pyList(Profiler.snapshot().enumerated().map { i, e in
            try pyTuple([pyString(KernelClass(rawValue: i)!.name), pyInt(Int(e.ns)), pyInt(Int(e.calls))])
        })
    }, doc: "profile_snapshot() -> [(class, nanoseconds, calls)] in kernel-class order."),

    Method("live_storages", { args in
        try args.expect(0)
        return pyInt(TensorStorage.liveCount.current)
    }, doc: "live_storages() -> number of Swift storages alive (leak checks)."),
]
