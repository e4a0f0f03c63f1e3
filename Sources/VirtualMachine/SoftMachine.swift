import Foundation
import GuestMemory
import SoftBackend
import Stage2
import Workload

/// The soft backend behind the VirtualMachine interface.
final class SoftMachine: VirtualMachine {
    let vm: SoftVM
    let memory: HostMemory
    var backend: BackendKind { .soft }
    var vcpuCount: Int { vm.vcpus.count }
    var pages: UInt64 { memory.size >> 12 }

    init(_ config: VMConfig) throws {
        vm = SoftVM(vcpus: config.vcpus)
        memory = try vm.addMemory(slot: 0, gpa: GPA(0), size: config.memory, backing: config.backing)
    }

    init(vm: SoftVM, memory: HostMemory) {
        self.vm = vm
        self.memory = memory
    }

    func run(_ spec: WorkloadSpec, timeout: Double) throws -> [VCPURun] {
        try vm.run(spec, timeout: timeout).map(VCPURun.init)
    }

    func enableDirtyLogging(_ config: DirtyLogConfig) throws { try vm.mmu.enableDirtyLogging(slot: 0, config) }
    func disableDirtyLogging() throws { try vm.mmu.disableDirtyLogging(slot: 0) }

    func getDirtyLog() throws -> [UInt64] {
        guard let log = vm.mmu.dirtyLog(slot: 0) else { throw DirtyLogError.notLogging(slot: 0) }
        if log.strategy == .ring {
            // Rings and the VMM's writes, as one bitmap; the harvested pages are re-protected.
            var words = [UInt64](repeating: 0, count: Int((pages + 63) / 64))
            for e in vm.mmu.harvestDirtyRings() where e.slot == 0 { words[Int(e.page >> 6)] |= 1 << (e.page & 63) }
            vm.mmu.resetDirtyRings()
            return words
        }
        return try vm.mmu.getDirtyLog(slot: 0)
    }

    func clearDirtyLog(firstPage: UInt64, bitmap: [UInt64]) throws {
        try vm.mmu.clearDirtyLog(slot: 0, firstPage: firstPage, bitmap: bitmap)
    }

    func writeGuest(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws { try vm.mmu.writeGuest(gpa, bytes) }

    func start(_ spec: WorkloadSpec, from state: VCPUStates?) throws {
        var positions: [VCPUPosition]?
        if let state {
            guard state.backend == .soft else { throw VMError.unsupported("vCPU state from a \(state.backend) VM cannot run on the soft backend") }
            positions = try JSONDecoder().decode([VCPUPosition].self, from: Data(state.bytes))
            guard positions!.count == vm.vcpus.count else {
                throw VMError.failed("the state holds \(positions!.count) vCPUs, this VM has \(vm.vcpus.count)")
            }
        }
        try vm.start(spec, from: positions)
    }

    func pause() throws { try vm.pause() }
    func setThrottle(percent: Int) { vm.setThrottle(percent: percent) }

    func markDirty(_ bitmap: [UInt64]) throws {
        guard let log = vm.mmu.dirtyLog(slot: 0) else { throw DirtyLogError.notLogging(slot: 0) }
        log.bitmap.set(bitmap: bitmap)
    }
    func resume() throws { try vm.resume() }

    func stop() throws -> [VCPURun] {
        try vm.stop().map(VCPURun.init)
    }

    func vcpuStates() throws -> VCPUStates {
        VCPUStates(backend: .soft, bytes: Array(try JSONEncoder().encode(vm.vcpus.map(\.position))))
    }
}

extension VCPURun {
    /// A soft vCPU's counters as the interface reports them (faults count as exits).
    init(_ s: VCPUStats) {
        self.init()
        accesses = s.accesses
        writes = s.writes
        exits = s.faults + s.exits
        nanoseconds = s.nanoseconds
        mismatches = s.mismatches
    }
}
