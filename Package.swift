// swift-tools-version:5.9
// mapet: Swift engine behind the `mapet` Python package.
//
// Environment read at build time (setup.py sets all three; each has a fallback so that
// `swift build` / `swift test` work in a plain checkout):
//   MAPET_PYTHON_INCLUDE  directory holding Python.h        (fallback: ask python3)
//   MAPET_OPENBLAS_LIB    directory holding libscipy_openblas.so (fallback: ask python3 for
//                         the pip package scipy-openblas32)
//   MAPET_TARGET_CPU      -target-cpu for the kernels      (default haswell: AVX2 + FMA + F16C)
import PackageDescription
import Foundation

let env = ProcessInfo.processInfo.environment

func askPython(_ code: String) -> String? {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = [env["PYTHON"] ?? "python3", "-c", code]
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = FileHandle.nullDevice
    guard (try? p.run()) != nil else { return nil }
    p.waitUntilExit()
    guard p.terminationStatus == 0 else { return nil }
    let s = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        .trimmingCharacters(in: .whitespacesAndNewlines)
    return s.isEmpty ? nil : s
}

let pythonInclude = env["MAPET_PYTHON_INCLUDE"]
    ?? askPython("import sysconfig; print(sysconfig.get_paths()['include'])")
    ?? "/usr/include/python3"
let blasLib = env["MAPET_OPENBLAS_LIB"]
    ?? askPython("import scipy_openblas32 as s; print(s.get_lib_dir())")
    ?? "/usr/lib"
let targetCPU = env["MAPET_TARGET_CPU"] ?? "haswell"
let packageDir = Context.packageDirectory

let pythonC: [CSetting] = [.unsafeFlags(["-I", pythonInclude, "-D_GNU_SOURCE"])]
let pythonSwift: [SwiftSetting] = [.unsafeFlags(["-Xcc", "-I", "-Xcc", pythonInclude, "-Xcc", "-D_GNU_SOURCE"])]

let package = Package(
    name: "mapet",
    products: [
        // The Python extension `mapet._core`; setup.py copies libMaPeTCore.so into the package.
        .library(name: "MaPeTCore", type: .dynamic, targets: ["PyModule"]),
        .library(name: "MaPeTKernels", targets: ["MaPeTKernels"]),
    ],
    targets: [
        // Prototypes of the few OpenBLAS entry points we call (scipy-openblas32: `scipy_` prefix).
        .target(
            name: "CBLAS",
            linkerSettings: [
                .unsafeFlags(["-L", blasLib]),
                .linkedLibrary("scipy_openblas"),
            ]
        ),
        // bf16 GEMM for AVX512-BF16 CPUs: C, AVX-512 only inside functions marked with target
        // attributes (selected at run time), so the library still loads and runs on AVX2 CPUs.
        .target(
            name: "CBF16",
            cSettings: [.unsafeFlags(["-O3"])]
        ),
        // Numerics: pure Swift, no Python, no Foundation.
        .target(
            name: "MaPeTKernels",
            dependencies: ["CBLAS", "CBF16"],
            swiftSettings: [
                // -Ounchecked (no overflow/bounds traps) measured against -O on the shared 2-core
                // machine: k-means fit ~30 % faster, ViT-Tiny train step ~10 %, AdamW the same.
                // Kept: PyModule checks every size and index before it reaches the kernels
                // (Sizes.swift, Buffers.swift), so no Python input gets here unchecked.
                .unsafeFlags(["-Ounchecked", "-wmo"], .when(configuration: .release)),
                .unsafeFlags(["-target-cpu", targetCPU]),
            ]
        ),
        // static inline shims over Python.h for what Swift cannot import.
        .target(name: "CPythonBridge", cSettings: pythonC),
        // The extension module: argument checking, GIL, conversions. No numerics.
        .target(
            name: "PyModule",
            dependencies: ["MaPeTKernels", "CPythonBridge"],
            exclude: ["exports.map"],
            swiftSettings: pythonSwift,
            linkerSettings: [
                .unsafeFlags([
                    "-static-stdlib",
                    "-Xlinker", "--version-script=\(packageDir)/Sources/PyModule/exports.map",
                    // The wheel depends on the scipy-openblas32 wheel installed beside it.
                    "-Xlinker", "-rpath", "-Xlinker", "$ORIGIN/../scipy_openblas32/lib",
                ]),
            ]
        ),
        .testTarget(
            name: "MaPeTKernelsTests",
            dependencies: ["MaPeTKernels"],
            swiftSettings: [.unsafeFlags(["-target-cpu", targetCPU])],
            linkerSettings: [.unsafeFlags(["-Xlinker", "-rpath", "-Xlinker", blasLib])]
        ),
    ]
)
