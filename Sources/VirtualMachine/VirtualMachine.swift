import GuestMemory
import KVMBackend
import SoftBackend
import Stage2
import Workload

/// Which hypervisor runs the guest.
public enum BackendKind: String, Sendable, CaseIterable, CustomStringConvertible {
    /// Our stage-2 MMU and software vCPUs.
    case soft
    /// Linux /dev/kvm running the guest program.
    case kvm
    public var description: String { rawValue }

    /// The lowest GPA a workload may use: the KVM guest program keeps the first MiB for itself.
    public var workloadBase: GPA { self == .kvm ? X86Layout.reservedEnd : GPA(0) }
}

/// What a VM is made of.
public struct VMConfig: Sendable {
    public var backend: BackendKind
    /// The RAM slots (one at GPA 0 unless told otherwise).
    public var layout: RAMLayout
    public var backing: Backing
    public var vcpus: Int
    /// Bytes per vCPU dirty ring on KVM (16 per entry); the soft backend's rings hold 4096 entries.
    public var dirtyRingBytes: Int
    public init(backend: BackendKind, memory: UInt64, backing: Backing, vcpus: Int, dirtyRingBytes: Int = 1 << 20) {
        self.init(backend: backend, layout: RAMLayout(size: memory), backing: backing, vcpus: vcpus, dirtyRingBytes: dirtyRingBytes)
    }
    public init(backend: BackendKind, layout: RAMLayout, backing: Backing, vcpus: Int, dirtyRingBytes: Int = 1 << 20) {
        self.backend = backend
        self.layout = layout
        self.backing = backing
        self.vcpus = vcpus
        self.dirtyRingBytes = dirtyRingBytes
    }
}

/// One vCPU's share of a run.
public struct VCPURun: Sendable, Equatable {
    public var accesses: UInt64 = 0
    public var writes: UInt64 = 0
    /// Exits to the VMM (faults and exits on soft, KVM_RUN returns on kvm).
    public var exits: UInt64 = 0
    public var nanoseconds: UInt64 = 0
    /// Counter-pattern checks that found a page not holding what the guest last stored there.
    public var mismatches: UInt64 = 0
    public init() {}
}

public enum VMError: Error, CustomStringConvertible {
    case unsupported(String)
    case failed(String)
    public var description: String {
        switch self {
        case let .unsupported(what): return what
        case let .failed(what): return what
        }
    }
}

/// A guest with RAM in one or more memslots, as either backend runs it. Migration, snapshots and the
/// CLI drive this interface without knowing which backend is behind it. Dirty bitmaps number RAM
/// pages across the slots (GuestRAM); workloads use linear addresses (RAMLayout).
public protocol VirtualMachine: AnyObject {
    var backend: BackendKind { get }
    var vcpuCount: Int { get }
    /// The guest's RAM: slot 0 at GPA 0, then any others.
    var ram: GuestRAM { get }

    /// Runs `spec` on every vCPU (vCPU i with its own stream) until it ends.
    func run(_ spec: WorkloadSpec, timeout: Double) throws -> [VCPURun]

    func enableDirtyLogging(_ config: DirtyLogConfig) throws
    func disableDirtyLogging() throws
    /// Pages dirtied since the last call (bit i of word w = RAM page 64w+i); see DirtyLogConfig for
    /// when they are re-protected.
    func getDirtyLog() throws -> [UInt64]
    /// Re-protects the pages `bitmap` names, its first bit being RAM page `firstPage` (a multiple of 64).
    func clearDirtyLog(firstPage: UInt64, bitmap: [UInt64]) throws
    /// Writes into guest memory as the VMM; recorded in the dirty log.
    func writeGuest(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws

    // Running in the background, as a migration needs: start, pause, resume, stop, and the vCPUs'
    // place in their streams (to continue them on another VM).
    func start(_ spec: WorkloadSpec, from state: VCPUStates?) throws
    func pause() throws
    func resume() throws
    func stop() throws -> [VCPURun]
    /// The vCPUs' state; meaningful while paused.
    func vcpuStates() throws -> VCPUStates
    /// Slows the guest's vCPUs to (100 - percent)% of their time, so a migration can converge.
    func setThrottle(percent: Int)
    /// Puts pages back into the dirty log (a snapshot that failed to write them reports them again).
    func markDirty(_ bitmap: [UInt64]) throws
}

extension VirtualMachine {
    /// Pages of RAM, the size of a dirty bitmap.
    public var pages: UInt64 { ram.pages }

    /// The lowest GPA a workload may use (the KVM guest program keeps the first MiB for itself).
    public var workloadBase: GPA { backend.workloadBase }
}

/// The vCPUs' state a migration carries, opaque to the engine: encoded by the backend.
public struct VCPUStates: Sendable, Equatable {
    public var backend: BackendKind
    public var bytes: [UInt8]
    public init(backend: BackendKind, bytes: [UInt8]) {
        self.backend = backend
        self.bytes = bytes
    }
}

/// Puts an existing soft VM (its RAM slots made by `SoftVM.addRAM`) behind the interface, e.g. to migrate it.
public func makeVirtualMachine(wrapping vm: SoftVM, ram: GuestRAM) -> any VirtualMachine {
    SoftMachine(vm: vm, ram: ram)
}

/// Builds a VM on the chosen backend.
public func makeVirtualMachine(_ config: VMConfig) throws -> any VirtualMachine {
    switch config.backend {
    case .soft: return try SoftMachine(config)
    case .kvm: return try KVMMachine(config)
    }
}
