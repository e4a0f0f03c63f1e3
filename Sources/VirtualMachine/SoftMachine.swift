import DirtyLog
import Foundation
import GuestMemory
import SoftBackend
import Stage2
import Workload

/// The soft backend behind the VirtualMachine interface.
final class SoftMachine: VirtualMachine, Sendable {   // SoftVM synchronizes; see its locks
    let vm: SoftVM
    let ram: GuestRAM
    var backend: BackendKind { .soft }
    /// Serializes logging changes, so two enables cannot both pass the one-mode check.
    private let changeLock = NSLock()
    var vcpuCount: Int { vm.vcpus.count }

    convenience init(_ config: VMConfig) throws {
        let vm = SoftVM(vcpus: config.vcpus, ringCapacity: config.dirtyRingEntries)
        self.init(vm: vm, ram: try vm.addRAM(config.layout, backing: config.backing))
    }

    init(vm: SoftVM, ram: GuestRAM) {
        self.vm = vm
        self.ram = ram
        // A vCPU whose ring is full exits to us: move the rings into the slot logs and reset them, so
        // it runs on (KVM's backend does the same on KVM_EXIT_DIRTY_RING_FULL).
        let mmu = vm.mmu
        for v in vm.vcpus where v.nested == nil {
            let previous = v.exitHandler
            v.exitHandler = { exit in
                if case .dirtyRingFull = exit { mmu.drainDirtyRings(); return 0 }
                return previous(exit)
            }
        }
    }

    var capabilities: VMCapabilities {
        VMCapabilities(strategies: DirtyStrategy.allCases, manualProtect: true, maxRingEntries: 1 << 16,
                       ringsAnyTime: true, readOnlySlots: true, maxSlots: vm.mmu.memslots.maxSlots)
    }

    var slots: [SlotInfo] {
        vm.mmu.memslots.slots.map { s in
            SlotInfo(id: s.id, gpa: s.gpaRange.start, size: s.size, readOnly: s.flags.contains(.readOnly),
                     logging: vm.mmu.dirtyLog(slot: s.id)?.config, isRAM: s.id < ram.slots.count)
        }
    }

    // MARK: Memslots

    func addSlot(id: Int, gpa: GPA, memory: HostMemory, flags: MemslotFlags) throws {
        try changeLock.withLock { () throws in
            let mode = dirtyLogMode ?? DirtyLogConfig(strategy: .writeProtect)
            if flags.contains(.dirtyLogging) { try admit(mode) }
            try vm.mmu.addSlot(id: id, gpa: gpa, size: memory.size, memory: memory, flags: flags, logging: mode)
        }
    }

    func moveSlot(id: Int, to gpa: GPA) throws {
        _ = try ownSlot(id, for: "moved")
        try vm.mmu.moveSlot(id: id, to: gpa)
    }

    func deleteSlot(id: Int) throws {
        _ = try ownSlot(id, for: "deleted")
        try vm.mmu.deleteSlot(id: id)
    }

    func setSlotFlags(id: Int, _ flags: MemslotFlags) throws {
        if flags.contains(.readOnly) { _ = try ownSlot(id, for: "made read-only") }
        try changeLock.withLock { () throws in
            let mode = dirtyLogMode ?? DirtyLogConfig(strategy: .writeProtect)
            if flags.contains(.dirtyLogging) && vm.mmu.dirtyLog(slot: id) == nil { try admit(mode) }
            try vm.mmu.setSlotFlags(id: id, flags, logging: mode)
        }
    }

    // MARK: Dirty logging

    func enableDirtyLogging(slot: Int, _ config: DirtyLogConfig) throws {
        try changeLock.withLock { () throws in
            try admit(config)
            try vm.mmu.enableDirtyLogging(slot: slot, config)
        }
    }

    func disableDirtyLogging(slot: Int) throws {
        _ = try requireSlot(slot)
        let rings = vm.mmu.dirtyLog(slot: slot)?.strategy == .ring
        try vm.mmu.disableDirtyLogging(slot: slot)
        // The slot's entries still queued are dropped now, not reported by a later log of it.
        if rings { vm.mmu.drainDirtyRings() }
    }

    func getDirtyLog(slot: Int) throws -> [UInt64] {
        _ = try requireSlot(slot)
        return try vm.mmu.getDirtyLog(slot: slot)
    }

    func clearDirtyLog(slot: Int, firstPage: UInt64, bitmap: [UInt64]) throws {
        guard try clearable(slot, firstPage: firstPage, bitmap: bitmap) else { return }
        try vm.mmu.clearDirtyLog(slot: slot, firstPage: firstPage, bitmap: bitmap)
    }

    func markDirty(slot: Int, bitmap: [UInt64]) throws {
        _ = try requireSlot(slot)
        guard vm.mmu.dirtyLog(slot: slot) != nil else { throw DirtyLogError.notLogging(slot: slot) }
        vm.mmu.vmmWrites.mark(slot: slot, bitmap: bitmap)
    }

    func writeGuest(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws { try vm.mmu.writeGuest(gpa, bytes) }

    // MARK: Running

    func run(_ spec: WorkloadSpec, timeout: Double) throws -> [VCPURun] {
        try admit(spec)
        return try vm.run(spec, timeout: timeout).map(VCPURun.init)
    }

    var workload: WorkloadSpec? { vm.workload }

    func start(_ spec: WorkloadSpec, paused: Bool) throws {
        try admit(spec)
        try vm.start(spec, paused: paused)
    }

    func start(from state: MachineState, paused: Bool) throws {
        let (spec, positions) = try Self.decode(state, vcpus: vm.vcpus.count)
        try admit(spec)
        try vm.start(spec, from: positions, paused: paused)
    }

    var runState: RunState { !vm.isRunning ? .stopped : vm.isPaused ? .paused : .running }

    func pause() throws { try vm.pause() }
    func setThrottle(percent: Double, vcpu: Int?) { vm.setThrottle(percent: percent, vcpu: vcpu) }

    func dirtyRingCounts() throws -> [UInt64] {
        guard dirtyLogMode?.strategy == .ring else { throw VMError.ringCountsNeedRing }
        vm.mmu.drainDirtyRings()
        return vm.vcpus.map { UInt64($0.ring.pushedTotal) }
    }
    func resume() throws { try vm.resume() }

    func stop() throws -> [VCPURun] {
        try vm.stop().map(VCPURun.init)
    }

    // MARK: State

    /// Format 1: the workload spec (u32 length, UTF-8), the vCPU count (u32), then per vCPU its
    /// place in its stream: generator state, cursor, sequence number, accesses done (u64 each).
    /// Format 0 (version 2 and 3 files): the spec, then the positions as JSON.
    static let stateFormat: UInt16 = 1

    func saveState() throws -> MachineState {
        guard let workload else { throw VMError.failed("the guest is not started: it has no state to save") }
        guard runState != .running else { throw VMError.failed("the guest's state is taken while it is paused: pause it first") }
        // Started paused, a vCPU thread may not have begun: wait until every one is parked.
        try vm.pause()
        var w = StateWriter()
        w.string(workload.description)
        w.int(UInt32(vm.vcpus.count))
        for p in vm.vcpus.map(\.position) {
            for field in [p.state, p.cursor, p.seq, p.done] { w.int(field) }
        }
        return MachineState(backend: .soft, format: Self.stateFormat, bytes: w.bytes)
    }

    static func decode(_ state: MachineState, vcpus: Int) throws -> (WorkloadSpec, [VCPUPosition]) {
        try StateReader.check(state, is: .soft, newest: stateFormat)
        var r = StateReader(state)
        let spec = try r.workload()
        if state.format == 0 {
            guard let positions = try? JSONDecoder().decode([VCPUPosition].self, from: Data(r.remaining)), positions.count == vcpus else {
                throw VMError.failed("the soft backend's state (format 0) does not hold the positions of \(vcpus) vCPUs: it is damaged")
            }
            return (spec, positions)
        }
        try r.vcpus(vcpus)
        let positions = try (0..<vcpus).map { _ in
            VCPUPosition(state: try r.int(), cursor: try r.int(), seq: try r.int(), done: try r.int())
        }
        try r.finish()
        return (spec, positions)
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
