import Foundation
import DirtyLog
import GuestMemory
import KVMBackend
import SoftBackend
import Stage2
import Synchronization
import Workload

/// The KVM backend behind the VirtualMachine interface. Dirty logging: `wp` is KVM's dirty bitmap
/// (with manual protect if asked), `ring` is KVM's dirty ring; the soft MMU's other strategies have
/// no KVM counterpart.
final class KVMMachine: VirtualMachine, @unchecked Sendable {   // mutable state under changeLock / ringLock / the runner's
    let system: KVMSystem
    let vm: KVMVM
    let ram: GuestRAM
    private var vcpus: [KVMVCPU] = []
    private let vcpuTotal: Int
    private let ringEntries: Int
    /// The mode of the logging slots, while any logs.
    private var mode: DirtyLogConfig?
    /// Serializes slot and logging changes (and guards `mode`): each reads a slot and writes it back
    /// whole, so a racing change is never undone.
    private let changeLock = NSLock()
    /// Serializes ring harvests and resets, which KVM requires to go in order (and guards `ringCounts`).
    private let ringLock = NSLock()
    /// Entries harvested from each vCPU's ring since the VM was made.
    private var ringCounts: [UInt64]
    var backend: BackendKind { .kvm }
    var vcpuCount: Int { vcpuTotal }

    init(_ config: VMConfig) throws {
        guard config.vcpus <= X86Layout.maxVCPUs else { throw VMError.unsupported("the kvm backend runs at most \(X86Layout.maxVCPUs) vCPUs") }
        guard config.layout.regions[0].size > X86Layout.reservedEnd.raw else {
            throw VMError.unsupported("the kvm backend needs more than 1 MiB of memory in its first slot (the guest program's pages)")
        }
        system = try KVMSystem()
        vm = try KVMVM(system: system)
        ram = try GuestRAM(layout: config.layout, backing: config.backing)
        vcpuTotal = config.vcpus
        ringCounts = Array(repeating: 0, count: config.vcpus)
        ringEntries = config.dirtyRingEntries
        let maxRing = Int(system.capability(.dirtyLogRing)) / KVMDirtyRing.entryBytes
        if maxRing > 0 && ringEntries > maxRing {
            throw VMError.unsupported("a dirty ring of \(ringEntries) entries: KVM here allows at most \(maxRing)")
        }
        for (i, (r, m)) in zip(ram.layout.regions, ram.slots).enumerated() {
            try vm.setMemory(slot: UInt32(i), gpa: r.gpa, memory: m)
        }
    }

    /// vCPUs are created on first use: a dirty ring must be enabled before any exists. Under
    /// `changeLock`, so a ring enabled at the same time is on before the first vCPU is made or refused
    /// after (a vCPU made in between would have a ring nobody reads); and under `ringLock`, which
    /// harvests read `vcpus` under.
    private func ensureVCPUs() throws {
        try changeLock.withLock {
            guard vcpus.isEmpty else { return }
            let made = try (0..<vcpuTotal).map { i throws(KVMError) in try vm.createVCPU(id: Int32(i)) }
            ringLock.withLock { vcpus = made }
        }
    }

    var capabilities: VMCapabilities {
        let ring = Int(system.capability(.dirtyLogRing)) / KVMDirtyRing.entryBytes
        // Once the vCPUs are made with rings, KVM keeps no dirty bitmap.
        let strategies: [DirtyStrategy] = ring == 0 ? [.writeProtect] : vm.dirtyRingBytes > 0 ? [.ring] : [.writeProtect, .ring]
        return VMCapabilities(strategies: strategies,
                              manualProtect: system.capability(.manualDirtyLogProtect2) > 0, maxRingEntries: ring,
                              ringsAnyTime: false, readOnlySlots: system.capability(.readOnlyMemory) > 0,
                              maxSlots: Int(system.capability(.memslots)))
    }

    var slots: [SlotInfo] { changeLock.withLock { slotsLocked() } }

    /// Every slot as it is; the caller holds `changeLock`.
    private func slotsLocked() -> [SlotInfo] {
        vm.slotList().sorted { $0.gpa < $1.gpa }.map { s in
            SlotInfo(id: Int(s.id), gpa: s.gpa, size: s.size, readOnly: s.readOnly, logging: s.logDirty ? mode : nil,
                     isRAM: Int(s.id) < ram.slots.count)
        }
    }

    /// Slot `id` as it is; the caller holds `changeLock`.
    private func slotLocked(_ id: Int) throws -> (info: SlotInfo, memory: HostMemory) {
        guard let s = slotsLocked().first(where: { $0.id == id }), let m = vm.memory(slot: UInt32(id)) else {
            throw VMError.failed("there is no memslot \(id)")
        }
        return (s, m)
    }

    // MARK: Memslots

    func addSlot(id: Int, gpa: GPA, memory: HostMemory, flags: MemslotFlags) throws {
        let caps = capabilities
        guard id >= 0, id < caps.maxSlots else { throw VMError.unsupported("memslot id \(id): KVM here takes ids 0..<\(caps.maxSlots)") }
        if flags.contains(.dirtyLogging) && flags.contains(.readOnly) { throw DirtyLogError.readOnlyAndLogging(id) }
        if flags.contains(.readOnly) && !caps.readOnlySlots { throw VMError.unsupported("KVM here has no read-only memslots (KVM_CAP_READONLY_MEM)") }
        if flags.contains(.dirtyLogging) { try admit(changeLock.withLock { defaultMode }) }
        try changeLock.withLock {
            guard vm.memory(slot: UInt32(id)) == nil else { throw GuestMemoryError.duplicateSlot(id) }
            if flags.contains(.dirtyLogging) { try startLogging(defaultMode) }
            do {
                try vm.setMemory(slot: UInt32(id), gpa: gpa, memory: memory, logDirty: flags.contains(.dirtyLogging),
                                 readOnly: flags.contains(.readOnly))
            } catch { endLoggingIfIdle(); throw error }
        }
    }

    func moveSlot(id: Int, to gpa: GPA) throws {
        _ = try ownSlot(id, for: "moved")
        try changeLock.withLock {
            let (s, memory) = try slotLocked(id)
            try vm.setMemory(slot: UInt32(id), gpa: gpa, memory: memory, logDirty: s.logging != nil, readOnly: s.readOnly)
        }
    }

    func deleteSlot(id: Int) throws {
        _ = try ownSlot(id, for: "deleted")
        try changeLock.withLock {
            try vm.deleteMemory(slot: UInt32(id))
            endLoggingIfIdle()
        }
    }

    func setSlotFlags(id: Int, _ flags: MemslotFlags) throws {
        if flags.contains(.dirtyLogging) && flags.contains(.readOnly) { throw DirtyLogError.readOnlyAndLogging(id) }
        if flags.contains(.dirtyLogging) { try admit(changeLock.withLock { defaultMode }) }
        let before = try changeLock.withLock { try slotLocked(id).info }
        if flags.contains(.readOnly) != before.readOnly {
            _ = try ownSlot(id, for: "made \(flags.contains(.readOnly) ? "read-only" : "writable")")
            guard capabilities.readOnlySlots else { throw VMError.unsupported("KVM here has no read-only memslots (KVM_CAP_READONLY_MEM)") }
        }
        try changeLock.withLock {
            let (s, memory) = try slotLocked(id)
            let logDirty = flags.contains(.dirtyLogging)
            if logDirty && s.logging == nil { try startLogging(defaultMode) }
            if flags.contains(.readOnly) != s.readOnly {
                // KVM cannot change the read-only flag in place: delete the slot and add it again (the
                // guest program reaches only RAM, which stays writable); on failure, put it back.
                try vm.deleteMemory(slot: UInt32(id))
                do {
                    try vm.setMemory(slot: UInt32(id), gpa: s.gpa, memory: memory, logDirty: logDirty, readOnly: flags.contains(.readOnly))
                } catch {
                    try? vm.setMemory(slot: UInt32(id), gpa: s.gpa, memory: memory, logDirty: s.logging != nil, readOnly: s.readOnly)
                    endLoggingIfIdle()
                    throw error
                }
            } else if logDirty != (s.logging != nil) {
                do { try vm.setMemory(slot: UInt32(id), gpa: s.gpa, memory: memory, logDirty: logDirty) }
                catch { endLoggingIfIdle(); throw error }
            }
            endLoggingIfIdle()
        }
    }

    // MARK: Dirty logging

    /// The mode a slot logs in when only the flag asks: the VM's current one; else write-protect, or
    /// ring once this VM's vCPUs were made with rings (KVM then has no bitmap). The caller holds
    /// `changeLock`.
    private var defaultMode: DirtyLogConfig {
        mode ?? DirtyLogConfig(strategy: vm.dirtyRingBytes > 0 ? .ring : .writeProtect)
    }

    /// Sets KVM up for `config` if no slot logs yet (manual protect, rings), or refuses a mode other
    /// than the one the logging slots share. The caller holds `changeLock`.
    private func startLogging(_ config: DirtyLogConfig) throws {
        if let mode {
            guard mode == config else {
                throw VMError.unsupported("other slots log with \(mode.strategy)\(mode.manualProtect ? " (manual protect)" : ""): every logging slot shares one mode, as KVM's are per VM; stop them first")
            }
            return
        }
        switch config.strategy {
        case .ring:
            if vm.dirtyRingBytes == 0 {
                guard vcpus.isEmpty else {
                    throw VMError.unsupported("KVM's dirty ring must be chosen before the vCPUs first run: enable ring logging before start")
                }
                try vm.enableDirtyRing(bytes: ringEntries * KVMDirtyRing.entryBytes)
            }
            // Rings are harvested and reset: the VMM's own log forgets what a get reports.
            if vm.manualProtect { try vm.setManualProtect(false) }
        default:
            guard vm.dirtyRingBytes == 0 else {
                throw VMError.unsupported("this VM's vCPUs were made with dirty rings, and KVM then keeps no dirty bitmap: log with ring")
            }
            if capabilities.manualProtect { try vm.setManualProtect(config.manualProtect, initiallySet: config.initiallySet) }
        }
        mode = config
    }

    /// Forgets the mode once no slot logs, so the next enable may choose another. The caller holds
    /// `changeLock`.
    private func endLoggingIfIdle() {
        if !vm.slotList().contains(where: \.logDirty) { mode = nil }
    }

    func enableDirtyLogging(slot: Int, _ config: DirtyLogConfig) throws {
        try admit(config)
        try changeLock.withLock {
            let (s, memory) = try slotLocked(slot)
            guard s.logging == nil else { throw DirtyLogError.alreadyLogging(slot: slot) }
            guard !s.readOnly else { throw DirtyLogError.readOnlySlot(slot) }
            try startLogging(config)
            do { try vm.setMemory(slot: UInt32(slot), gpa: s.gpa, memory: memory, logDirty: true) }
            catch { endLoggingIfIdle(); throw error }
        }
    }

    func disableDirtyLogging(slot: Int) throws {
        try changeLock.withLock {
            let (s, memory) = try slotLocked(slot)
            guard s.logging != nil else { throw DirtyLogError.notLogging(slot: slot) }
            try vm.setMemory(slot: UInt32(slot), gpa: s.gpa, memory: memory, logDirty: false)
            endLoggingIfIdle()
            // The slot's entries still queued are dropped now, not reported by a later log of it (a
            // failed drain leaves them to be dropped at the next harvest, or reported once extra).
            if s.logging?.strategy == .ring { try? harvestRings() }
        }
    }

    func getDirtyLog(slot: Int) throws -> [UInt64] {
        let s = try changeLock.withLock { try slotLocked(slot).info }
        guard let logging = s.logging else { throw DirtyLogError.notLogging(slot: slot) }
        if logging.strategy == .ring {
            try harvestRings()
            var words = [UInt64](repeating: 0, count: Int((s.size >> 12 + 63) / 64))
            vm.takeVMMDirty(slot: UInt32(slot), into: &words)
            return words
        }
        return try vm.getDirtyLog(slot: UInt32(slot))
    }

    /// Collects every vCPU ring into the slot logs, then resets the rings (re-protecting those pages)
    /// in full before returning.
    private func harvestRings() throws(KVMError) {
        ringLock.lock()
        defer { ringLock.unlock() }
        var entries: [(slot: UInt32, page: UInt64)] = []
        for (i, v) in vcpus.enumerated() {
            ringCounts[i] += UInt64(v.dirtyRing?.harvest { slot, page in entries.append((slot, page)) } ?? 0)
        }
        vm.markDirty(entries: entries)
        try vm.resetDirtyRings()
    }

    func clearDirtyLog(slot: Int, firstPage: UInt64, bitmap: [UInt64]) throws {
        guard try clearable(slot, firstPage: firstPage, bitmap: bitmap) else { return }
        try vm.clearDirtyLog(slot: UInt32(slot), firstPage: firstPage, bitmap: bitmap)
    }

    func markDirty(slot: Int, bitmap: [UInt64]) throws {
        guard try requireSlot(slot).logging != nil else { throw DirtyLogError.notLogging(slot: slot) }
        vm.markDirty(slot: UInt32(slot), bitmap: bitmap)
    }

    func writeGuest(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws { try vm.writeGuest(gpa, bytes) }

    // MARK: Running

    /// Runs `spec` to its end in the background machinery, waiting at most `timeout` seconds.
    func run(_ spec: WorkloadSpec, timeout: Double) throws -> [VCPURun] {
        try start(spec, paused: false)
        guard let runner, runner.control.waitFinished(timeout: timeout) else {
            _ = try? stop()
            throw VMError.failed("the guest workload did not finish within \(timeout) s")
        }
        return try stop()
    }

    // Read by other threads (a dirty limiter's throttles, run state) while start and stop change
    // it; two threads may stop the guest at once (a failing helper and its owner).
    private let runnerLock = NSLock()
    /// Held through a start, so two cannot both find the guest stopped.
    private let startLock = NSLock()
    private var _runner: KVMRunner?
    private var runner: KVMRunner? {
        get { runnerLock.withLock { _runner } }
        set { runnerLock.withLock { _runner = newValue } }
    }

    /// The vCPU threads hold the VM: a machine dropped while its guest runs stops it first.
    deinit {
        if let runner {
            runner.control.stopAll(kick: runner.kickAll)
            _ = runner.control.waitFinished(timeout: 10)
        }
    }

    var workload: WorkloadSpec? { runner?.spec }

    func start(_ spec: WorkloadSpec, paused: Bool) throws {
        try start(spec, restoring: nil, paused: paused)
    }

    func start(from state: MachineState, paused: Bool) throws {
        let (spec, registers) = try Self.decode(state, vcpus: vcpuTotal)
        try start(spec, restoring: registers, paused: paused)
    }

    private func start(_ spec: WorkloadSpec, restoring registers: [KVMVCPUState]?, paused: Bool) throws {
        startLock.lock(); defer { startLock.unlock() }
        guard runner == nil else { throw VMError.failed("the guest is already running: stop it first") }
        try admit(spec)
        try ensureVCPUs()
        if let registers {
            for (v, s) in zip(vcpus, registers) { try v.restoreState(s) }
        }
        runner = KVMRunner(vcpus: vcpus, ram: ram, spec: spec, restored: registers != nil, paused: paused,
                           onRingFull: { [weak self] () throws(KVMError) in try self?.harvestRings() })
    }

    var runState: RunState { runner.map { $0.control.pauseRequested ? .paused : .running } ?? .stopped }

    func pause() throws {
        guard let runner else { throw VMError.failed("the guest is not running") }
        guard runner.control.pauseAll(timeout: 10, kick: runner.kickAll) else {
            throw VMError.failed("the vCPUs did not pause within 10 s")
        }
    }

    func resume() throws {
        guard let runner else { throw VMError.failed("the guest is not running") }
        runner.control.resumeAll()
    }

    func stop() throws -> [VCPURun] {
        guard let runner else { throw VMError.failed("the guest is not running") }
        runner.control.stopAll(kick: runner.kickAll)
        guard runner.control.waitFinished(timeout: 10) else { throw VMError.failed("the vCPUs did not stop within 10 s") }
        runnerLock.withLock { if _runner === runner { _runner = nil } }
        return try runner.results.values.map { r in
            switch r {
            case let .success(s): return s
            case let .failure(e): throw e
            case nil: throw VMError.failed("a vCPU thread ended without a result")
            }
        }
    }

    func saveState() throws -> MachineState {
        guard let workload else { throw VMError.failed("the guest is not started: it has no state to save") }
        guard runState != .running else { throw VMError.failed("the guest's state is taken while it is paused: pause it first") }
        // Started paused, a vCPU may still be loading the guest program: wait until every one is parked.
        try pause()
        return Self.encode(workload, try vcpus.map { v throws(KVMError) in try v.saveState() })
    }

    func setThrottle(percent: Double, vcpu: Int?) { runner?.control.setThrottle(percent: percent, vcpu: vcpu) }

    func dirtyRingCounts() throws -> [UInt64] {
        guard changeLock.withLock({ mode?.strategy }) == .ring else { throw VMError.ringCountsNeedRing }
        try harvestRings()
        return ringLock.withLock { ringCounts }
    }

}
