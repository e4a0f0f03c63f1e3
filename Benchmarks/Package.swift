// swift-tools-version:6.1
import PackageDescription

// Allocation budgets on the hot paths (ordo-one/benchmark): what is stable where time is not.
// `swift package benchmark thresholds check` fails when a path allocates more (or less) than its
// committed budget in Thresholds/. Times and the side-by-side figures stay with `vmm bench`.
let package = Package(
    name: "vmm-benchmarks",
    platforms: [.macOS(.v13)],   // the benchmark package's floor; this project runs on Linux
    dependencies: [
        .package(name: "vmm", path: ".."),
        // MallocInterposer counts malloc/free through an LD_PRELOADed library; no jemalloc.
        .package(url: "https://github.com/ordo-one/benchmark", exact: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "HotPaths",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "GuestMemory", package: "vmm"),
                .product(name: "DirtyLog", package: "vmm"),
                .product(name: "Stage2", package: "vmm"),
                .product(name: "SoftBackend", package: "vmm"),
                .product(name: "VirtualMachine", package: "vmm"),
                .product(name: "Migration", package: "vmm"),
                .product(name: "Workload", package: "vmm"),
            ],
            path: "Benchmarks/HotPaths",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
