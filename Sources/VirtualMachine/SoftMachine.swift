import Foundation
import GuestMemory
import SoftBackend
import Stage2
import Workload

/// The soft backend behind the VirtualMachine interface.
final class SoftMachine: VirtualMachine {
    let vm: SoftVM
    let ram: GuestRAM
    var backend: BackendKind { .soft }
    var vcpuCount: Int { vm.vcpus.count }

    init(_ config: VMConfig) throws {
        vm = SoftVM(vcpus: config.vcpus)
        ram = try vm.addRAM(config.layout, backing: config.backing)
    }

    init(vm: SoftVM, ram: GuestRAM) {
        self.vm = vm
        self.ram = ram
    }

    private var slotIDs: Range<Int> { 0..<ram.slots.count }

    func run(_ spec: WorkloadSpec, timeout: Double) throws -> [VCPURun] {
        try vm.run(spec, timeout: timeout).map(VCPURun.init)
    }

    func enableDirtyLogging(_ config: DirtyLogConfig) throws {
        for s in slotIDs { try vm.mmu.enableDirtyLogging(slot: s, config) }
    }

    func disableDirtyLogging() throws {
        for s in slotIDs { try vm.mmu.disableDirtyLogging(slot: s) }
    }

    func getDirtyLog() throws -> [UInt64] {
        guard let log = vm.mmu.dirtyLog(slot: 0) else { throw DirtyLogError.notLogging(slot: 0) }
        var words = [UInt64](repeating: 0, count: ram.bitmapWords)
        if log.strategy == .ring {
            // Rings and the VMM's writes, as one bitmap; the harvested pages are re-protected.
            for e in vm.mmu.harvestDirtyRings() where slotIDs.contains(e.slot) {
                let p = ram.firstPage[e.slot] + e.page
                words[Int(p >> 6)] |= 1 << (p & 63)
            }
            vm.mmu.resetDirtyRings()
            return words
        }
        for s in slotIDs { words.replaceSubrange(ram.words(ofSlot: s), with: try vm.mmu.getDirtyLog(slot: s)) }
        return words
    }

    func clearDirtyLog(firstPage: UInt64, bitmap: [UInt64]) throws {
        try ram.forEachSlot(firstPage: firstPage, bitmap: bitmap) { s, first, part in
            try vm.mmu.clearDirtyLog(slot: s, firstPage: first, bitmap: part)
        }
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
        try ram.forEachSlot(firstPage: 0, bitmap: bitmap) { s, _, part in
            guard let log = vm.mmu.dirtyLog(slot: s) else { throw DirtyLogError.notLogging(slot: s) }
            log.bitmap.set(bitmap: part)
        }
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
