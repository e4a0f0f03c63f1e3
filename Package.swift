// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "vmm",
    products: [
        .executable(name: "vmm", targets: ["vmm"]),
        .library(name: "GuestMemory", targets: ["GuestMemory"]),
        .library(name: "DirtyLog", targets: ["DirtyLog"]),
        .library(name: "Stage2", targets: ["Stage2"]),
        .library(name: "Workload", targets: ["Workload"]),
        .library(name: "SoftBackend", targets: ["SoftBackend"]),
        .library(name: "KVMBackend", targets: ["KVMBackend"]),
        .library(name: "VirtualMachine", targets: ["VirtualMachine"]),
        .library(name: "Migration", targets: ["Migration"]),
        .library(name: "Control", targets: ["Control"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        // `swift package generate-documentation`: the DocC catalogs in each module.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        // Only what Swift cannot reach: syscall wrappers that glibc does not export to Swift.
        .target(name: "CVMMSys"),
        // The system layer: the system-call wrapper and the owners of descriptors and mappings.
        .target(name: "HostSystem", dependencies: ["CVMMSys"]),
        .target(name: "GuestMemory", dependencies: ["CVMMSys", "HostSystem"]),
        .target(name: "DirtyLog", dependencies: ["GuestMemory"]),
        .target(name: "Stage2", dependencies: ["HostSystem", "GuestMemory", "DirtyLog"]),
        .target(name: "Workload", dependencies: ["GuestMemory"]),
        .target(name: "SoftBackend", dependencies: ["GuestMemory", "DirtyLog", "Stage2", "Workload"]),
        .target(name: "KVMBackend", dependencies: ["CVMMSys", "HostSystem", "GuestMemory", "DirtyLog", "Workload"]),
        .target(name: "VirtualMachine", dependencies: ["GuestMemory", "DirtyLog", "Stage2", "Workload", "SoftBackend", "KVMBackend"]),
        .target(name: "Migration", dependencies: ["CVMMSys", "HostSystem", "GuestMemory", "DirtyLog", "Workload", "VirtualMachine",
                                                  .product(name: "Crypto", package: "swift-crypto")]),
        .target(name: "Control", dependencies: ["CVMMSys", "HostSystem", "GuestMemory", "Workload", "VirtualMachine", "Migration"]),
        .executableTarget(
            name: "vmm",
            dependencies: [
                "CVMMSys", "GuestMemory", "DirtyLog", "Stage2", "Workload", "SoftBackend", "KVMBackend", "VirtualMachine", "Migration", "Control",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "GuestMemoryTests", dependencies: ["GuestMemory"]),
        .testTarget(name: "Stage2Tests", dependencies: ["GuestMemory", "DirtyLog", "Stage2"]),
        .testTarget(name: "WorkloadTests", dependencies: ["Workload", "GuestMemory"]),
        .testTarget(name: "SoftBackendTests", dependencies: ["GuestMemory", "DirtyLog", "Stage2", "Workload", "SoftBackend"]),
        .testTarget(name: "VirtualMachineTests", dependencies: ["GuestMemory", "DirtyLog", "Stage2", "Workload", "VirtualMachine", "KVMBackend", "SoftBackend"]),
        // Fixtures are read by path (#filePath), not bundled.
        .testTarget(name: "MigrationTests", dependencies: ["GuestMemory", "DirtyLog", "Workload", "VirtualMachine", "Migration", "SoftBackend", "KVMBackend"],
                    exclude: ["Fixtures"]),
        .testTarget(name: "ControlTests", dependencies: ["GuestMemory", "Workload", "VirtualMachine", "Migration", "Control", "KVMBackend"]),
        .testTarget(name: "KVMBackendTests", dependencies: ["GuestMemory", "DirtyLog", "KVMBackend", "Workload", "Stage2", "SoftBackend"]),
    ],
    // Swift 6: shared state is Sendable by a Mutex or an atomic; the types that synchronize raw
    // memory themselves (tables, TLBs, rings, the KVM run area) say how on their @unchecked Sendable.
    swiftLanguageModes: [.v6]
)
