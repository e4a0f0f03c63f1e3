// swift-tools-version:6.0
import PackageDescription

// libFuzzer targets for every parser of bytes that come from outside (docs/fuzzing.md). They reach
// the parsers' internals, so they build only as `Fuzz/run` builds them: with -sanitize=fuzzer,address
// and -enable-testing. Each target's main hands its input callback to libFuzzer's driver.
let package = Package(
    name: "vmm-fuzz",
    dependencies: [
        .package(name: "vmm", path: ".."),
    ],
    targets: [
        .target(name: "CFuzzer"),
        .target(name: "FuzzSupport", dependencies: ["CFuzzer", .product(name: "Migration", package: "vmm"),
                                                   .product(name: "VirtualMachine", package: "vmm"), .product(name: "GuestMemory", package: "vmm")]),
        .executableTarget(name: "FuzzStream", dependencies: ["FuzzSupport", .product(name: "Migration", package: "vmm"),
                                                             .product(name: "VirtualMachine", package: "vmm"),
                                                             .product(name: "GuestMemory", package: "vmm")]),
        .executableTarget(name: "FuzzSnapshot", dependencies: ["FuzzSupport", .product(name: "Migration", package: "vmm")]),
        .executableTarget(name: "FuzzKeyFile", dependencies: ["FuzzSupport", .product(name: "Migration", package: "vmm")]),
        .executableTarget(name: "FuzzOptions", dependencies: ["FuzzSupport", .product(name: "Migration", package: "vmm"),
                                                              .product(name: "Workload", package: "vmm"),
                                                              .product(name: "GuestMemory", package: "vmm")]),
        .executableTarget(name: "FuzzControl", dependencies: ["FuzzSupport", .product(name: "Control", package: "vmm"),
                                                              .product(name: "Migration", package: "vmm")]),
    ],
    swiftLanguageModes: [.v6]
)
