import Foundation
import GuestMemory
import KVMBackend
import SoftBackend
import Stage2
import Workload

/// The KVM backend behind the VirtualMachine interface. Dirty logging: `wp` is KVM's dirty bitmap
/// (with manual protect if asked), `ring` is KVM's dirty ring; the soft MMU's other strategies have
/// no KVM counterpart.
final class KVMMachine: VirtualMachine {
    let system: KVMSystem
    let vm: KVMVM
    let memory: HostMemory
    private var vcpus: [KVMVCPU] = []
    private let vcpuTotal: Int
    private let ringBytes: Int
    private var logging: DirtyLogConfig?
    /// Ring entries harvested (on ring-full exits, or by getDirtyLog) and not yet reported; the lock
    /// also serializes ring harvests, which KVM requires to go in order.
    private let ringLock = NSLock()
    private var ringPending: [UInt64] = []
    var backend: BackendKind { .kvm }
    var vcpuCount: Int { vcpuTotal }
    var workloadBase: GPA { X86Layout.reservedEnd }
    var pages: UInt64 { memory.size >> 12 }

    init(_ config: VMConfig) throws {
        guard config.vcpus <= X86Layout.maxVCPUs else { throw VMError.unsupported("the kvm backend runs at most \(X86Layout.maxVCPUs) vCPUs") }
        guard config.memory > X86Layout.reservedEnd.raw else { throw VMError.unsupported("the kvm backend needs more than 1 MiB of memory") }
        system = try KVMSystem()
        vm = try KVMVM(system: system)
        memory = try HostMemory(size: config.memory, backing: config.backing)
        try vm.setMemory(slot: 0, gpa: GPA(0), memory: memory)
        vcpuTotal = config.vcpus
        ringBytes = config.dirtyRingBytes
    }

    /// vCPUs are created on first use: a dirty ring must be enabled before any exists.
    private func ensureVCPUs() throws {
        if vcpus.isEmpty { vcpus = try (0..<vcpuTotal).map { i throws(KVMError) in try vm.createVCPU(id: Int32(i)) } }
    }

    func run(_ spec: WorkloadSpec, timeout: Double) throws -> [VCPURun] {
        guard spec.base >= workloadBase else {
            throw VMError.unsupported("on the kvm backend the working set starts at 1 MiB or above (the guest program's pages lie below)")
        }
        try ensureVCPUs()
        let vcpus = self.vcpus, memory = self.memory, vm = self.vm
        let results = RunResults(count: vcpus.count)
        let ringed = logging?.strategy == .ring
        let harvestRings = self.harvestRings
        runOnThreads(vcpus.count) { i in
            var total = VCPURun()
            let start = Date()
            var limit: Double = 0
            var part = spec
            if case let .duration(d) = spec.stop { limit = d; part.stop = .count(1_000_000) }
            var first = true
            do throws(KVMError) {
                repeat {
                    try vcpus[i].loadWorkload(part, index: i, memory: memory, continuing: !first)
                    first = false
                    let s = try vcpus[i].runWorkload(index: i, memory: memory, timeout: timeout) { () throws(KVMError) in
                        // A full ring: harvest it into the pending bitmap and reset, then run on.
                        if ringed { try harvestRings() }
                    }
                    total.accesses += s.accesses
                    total.writes += s.writes
                    total.exits += s.exits
                } while Date().timeIntervalSince(start) < limit
                total.nanoseconds = UInt64(Date().timeIntervalSince(start) * 1e9)
                results.set(i, .success(total))
            } catch {
                results.set(i, .failure(error))
            }
        }
        return try results.values.map { r in
            switch r {
            case let .success(s): return s
            case let .failure(e): throw e
            case nil: throw VMError.failed("a vCPU thread ended without a result")
            }
        }
    }

    func enableDirtyLogging(_ config: DirtyLogConfig) throws {
        switch config.strategy {
        case .writeProtect:
            if config.manualProtect { try vm.enableManualProtect(initiallySet: config.initiallySet) }
            else if config.initiallySet { throw DirtyLogError.initiallySetNeedsManualProtect }
        case .ring:
            guard vcpus.isEmpty else { throw VMError.unsupported("KVM's dirty ring must be enabled before the first run") }
            try vm.enableDirtyRing(bytes: min(ringBytes, Int(system.capability(.dirtyLogRing))))
        default:
            throw VMError.unsupported("the kvm backend logs with wp (KVM's dirty bitmap) or ring (KVM's dirty ring); \(config.strategy) is the soft MMU's")
        }
        try vm.setMemory(slot: 0, gpa: GPA(0), memory: memory, logDirty: true)
        logging = config
    }

    func disableDirtyLogging() throws {
        guard logging != nil else { throw DirtyLogError.notLogging(slot: 0) }
        try vm.setMemory(slot: 0, gpa: GPA(0), memory: memory)
        logging = nil
    }

    func getDirtyLog() throws -> [UInt64] {
        guard let logging else { throw DirtyLogError.notLogging(slot: 0) }
        if logging.strategy == .ring {
            try harvestRings()
            ringLock.lock()
            var words = ringPending
            ringPending = [UInt64](repeating: 0, count: words.count)
            ringLock.unlock()
            let vmm = try vm.getVMMDirty(slot: 0)
            for i in words.indices where i < vmm.count { words[i] |= vmm[i] }
            return words
        }
        return try vm.getDirtyLog(slot: 0, pages: pages)
    }

    /// Collects every vCPU ring into the pending bitmap and resets the rings (re-protecting those pages).
    private func harvestRings() throws(KVMError) {
        ringLock.lock()
        defer { ringLock.unlock() }
        if ringPending.isEmpty { ringPending = [UInt64](repeating: 0, count: Int((pages + 63) / 64)) }
        for v in vcpus {
            _ = v.dirtyRing?.harvest { slot, page in
                if slot == 0 && page < self.pages { self.ringPending[Int(page >> 6)] |= 1 << (page & 63) }
            }
        }
        try vm.resetDirtyRings()
    }

    func clearDirtyLog(firstPage: UInt64, bitmap: [UInt64]) throws {
        guard logging?.strategy == .writeProtect, logging?.manualProtect == true else {
            throw VMError.unsupported("clearDirtyLog needs wp logging with manual protect on the kvm backend")
        }
        try vm.clearDirtyLog(slot: 0, firstPage: firstPage, bitmap: bitmap)
    }

    func writeGuest(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws { try vm.writeGuest(gpa, bytes) }

    // Background runs with pause/resume are not built for KVM yet (migration runs on the soft backend).
    func start(_ spec: WorkloadSpec, from state: VCPUStates?) throws { throw Self.notYet }
    func pause() throws { throw Self.notYet }
    func resume() throws { throw Self.notYet }
    func stop() throws -> [VCPURun] { throw Self.notYet }
    func vcpuStates() throws -> VCPUStates { throw Self.notYet }
    func setThrottle(percent: Int) {}
    func markDirty(_ bitmap: [UInt64]) throws { throw Self.notYet }
    static let notYet = VMError.unsupported("background runs (start/pause/resume) are not built for the kvm backend yet; migrate a soft guest")
}

final class RunResults: @unchecked Sendable {
    private let lock = NSLock()
    private var results: [Result<VCPURun, KVMError>?]
    init(count: Int) { results = Array(repeating: nil, count: count) }
    func set(_ i: Int, _ r: Result<VCPURun, KVMError>) { lock.lock(); results[i] = r; lock.unlock() }
    var values: [Result<VCPURun, KVMError>?] { lock.lock(); defer { lock.unlock() }; return results }
}
