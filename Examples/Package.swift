// swift-tools-version:6.0
import PackageDescription

// What a VMM author writes: a package of its own that depends on this project's library products
// by path. CI builds and runs it (`swift run --package-path Examples`).
let package = Package(
    name: "vmm-examples",
    dependencies: [
        .package(name: "vmm", path: ".."),
    ],
    targets: [
        .executableTarget(
            name: "MigrateOverSocketPair",
            dependencies: [
                .product(name: "VirtualMachine", package: "vmm"),
                .product(name: "Migration", package: "vmm"),
                .product(name: "DirtyLog", package: "vmm"),
                .product(name: "Workload", package: "vmm"),
                .product(name: "GuestMemory", package: "vmm"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
