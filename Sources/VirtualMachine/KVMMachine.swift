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
    let ram: GuestRAM
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

    init(_ config: VMConfig) throws {
        guard config.vcpus <= X86Layout.maxVCPUs else { throw VMError.unsupported("the kvm backend runs at most \(X86Layout.maxVCPUs) vCPUs") }
        guard config.layout.regions[0].size > X86Layout.reservedEnd.raw else {
            throw VMError.unsupported("the kvm backend needs more than 1 MiB of memory in its first slot (the guest program's pages)")
        }
        system = try KVMSystem()
        vm = try KVMVM(system: system)
        ram = try GuestRAM(layout: config.layout, backing: config.backing)
        vcpuTotal = config.vcpus
        ringBytes = config.dirtyRingBytes
        try mapSlots()
    }

    /// (Re)maps every RAM slot, logging dirty pages or not.
    private func mapSlots(logDirty: Bool = false) throws {
        for (i, (r, m)) in zip(ram.layout.regions, ram.slots).enumerated() {
            try vm.setMemory(slot: UInt32(i), gpa: r.gpa, memory: m, logDirty: logDirty)
        }
    }

    /// vCPUs are created on first use: a dirty ring must be enabled before any exists.
    private func ensureVCPUs() throws {
        if vcpus.isEmpty { vcpus = try (0..<vcpuTotal).map { i throws(KVMError) in try vm.createVCPU(id: Int32(i)) } }
    }

    /// Runs `spec` to its end in the background machinery, waiting at most `timeout` seconds.
    func run(_ spec: WorkloadSpec, timeout: Double) throws -> [VCPURun] {
        try start(spec, from: nil)
        guard let runner, runner.control.waitFinished(timeout: timeout) else {
            _ = try? stop()
            throw VMError.failed("the guest workload did not finish within \(timeout) s")
        }
        return try stop()
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
        try mapSlots(logDirty: true)
        logging = config
    }

    func disableDirtyLogging() throws {
        guard logging != nil else { throw DirtyLogError.notLogging(slot: 0) }
        try mapSlots()
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
            for s in ram.slots.indices {
                let w = ram.words(ofSlot: s)
                for (i, v) in try vm.getVMMDirty(slot: UInt32(s)).enumerated() where i < w.count { words[w.lowerBound + i] |= v }
            }
            return words
        }
        var words = [UInt64](repeating: 0, count: ram.bitmapWords)
        for s in ram.slots.indices {
            words.replaceSubrange(ram.words(ofSlot: s), with: try vm.getDirtyLog(slot: UInt32(s), pages: ram.slots[s].size >> 12))
        }
        return words
    }

    /// Collects every vCPU ring into the pending bitmap and resets the rings (re-protecting those pages).
    private func harvestRings() throws(KVMError) {
        ringLock.lock()
        defer { ringLock.unlock() }
        if ringPending.isEmpty { ringPending = [UInt64](repeating: 0, count: ram.bitmapWords) }
        for v in vcpus {
            _ = v.dirtyRing?.harvest { slot, page in
                let s = Int(slot)
                guard s < self.ram.slots.count, page < UInt64(self.ram.pages(ofSlot: s).count) else { return }
                let p = self.ram.firstPage[s] + page
                self.ringPending[Int(p >> 6)] |= 1 << (p & 63)
            }
        }
        try vm.resetDirtyRings()
    }

    func clearDirtyLog(firstPage: UInt64, bitmap: [UInt64]) throws {
        guard logging?.strategy == .writeProtect, logging?.manualProtect == true else {
            throw VMError.unsupported("clearDirtyLog needs wp logging with manual protect on the kvm backend")
        }
        try ram.forEachSlot(firstPage: firstPage, bitmap: bitmap) { s, first, part in
            try vm.clearDirtyLog(slot: UInt32(s), firstPage: first, bitmap: part)
        }
    }

    func writeGuest(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws { try vm.writeGuest(gpa, bytes) }

    private var runner: KVMRunner?

    /// The vCPU threads hold the VM: a machine dropped while its guest runs stops it first.
    deinit {
        if let runner {
            runner.control.stopAll(kick: runner.kickAll)
            _ = runner.control.waitFinished(timeout: 10)
        }
    }

    func start(_ spec: WorkloadSpec, from state: VCPUStates?) throws {
        guard runner == nil else { throw VMError.failed("the guest is already running: stop it first") }
        guard spec.base >= workloadBase else {
            throw VMError.unsupported("on the kvm backend the working set starts at 1 MiB or above (the guest program's pages lie below)")
        }
        if let p = spec.problem() { throw VMError.unsupported("workload: \(p)") }
        try ensureVCPUs()
        var restore: [KVMVCPUState]?
        if let state {
            guard state.backend == .kvm else { throw VMError.unsupported("vCPU state from a \(state.backend) VM cannot run on the kvm backend") }
            let size = MemoryLayout<KVMVCPUState>.size
            guard state.bytes.count == size * vcpus.count else {
                throw VMError.failed("the vCPU state holds \(state.bytes.count) bytes; \(vcpus.count) KVM vCPUs need \(size * vcpus.count)")
            }
            restore = state.bytes.withUnsafeBytes { raw in (0..<vcpus.count).map { raw.load(fromByteOffset: $0 * size, as: KVMVCPUState.self) } }
            for (v, s) in zip(vcpus, restore!) { try v.restoreState(s) }
        }
        let ringed = logging?.strategy == .ring
        let harvest: () throws(KVMError) -> Void = ringed ? harvestRings : {}
        runner = KVMRunner(vcpus: vcpus, ram: ram, spec: spec, restored: restore != nil, onRingFull: harvest)
    }

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
        self.runner = nil
        return try runner.results.values.map { r in
            switch r {
            case let .success(s): return s
            case let .failure(e): throw e
            case nil: throw VMError.failed("a vCPU thread ended without a result")
            }
        }
    }

    /// Each vCPU's registers, special registers and FPU state, back to back (the guest program keeps
    /// everything else in guest memory).
    func vcpuStates() throws -> VCPUStates {
        var bytes: [UInt8] = []
        for v in vcpus {
            var s = try v.saveState()
            withUnsafeBytes(of: &s) { bytes += $0 }
        }
        return VCPUStates(backend: .kvm, bytes: bytes)
    }

    func setThrottle(percent: Int) { runner?.control.throttlePercent = percent }

    func markDirty(_ bitmap: [UInt64]) throws {
        guard logging != nil else { throw DirtyLogError.notLogging(slot: 0) }
        ram.forEachSlot(firstPage: 0, bitmap: bitmap) { s, _, part in vm.markDirty(slot: UInt32(s), bitmap: part) }
    }
}

/// The vCPU threads of a background run: each runs the guest program in chunks of accesses (continuing
/// one stream), paces it to the spec's rate and the auto-converge throttle at its progress exits, and
/// parks when paused. Pause and stop kick the threads out of KVM_RUN.
final class KVMRunner: @unchecked Sendable {
    let control: RunControl
    let results: RunResults
    private let lock = NSLock()
    private var threads: [pthread_t?]
    private let vcpus: [KVMVCPU]

    init(vcpus: [KVMVCPU], ram: GuestRAM, spec: WorkloadSpec, restored: Bool, onRingFull: @escaping () throws(KVMError) -> Void) {
        self.vcpus = vcpus
        control = RunControl(vcpus: vcpus.count)
        results = RunResults(count: vcpus.count)
        threads = Array(repeating: nil, count: vcpus.count)
        for i in vcpus.indices {
            let t = Thread { [self] in
                KVMVCPU.allowKicksOnThisThread()
                lock.lock(); threads[i] = pthread_self(); lock.unlock()
                do throws(KVMError) {
                    results.set(i, .success(try runVCPU(i, ram: ram, spec: spec, restored: restored, onRingFull: onRingFull)))
                } catch {
                    results.set(i, .failure(error))
                }
                lock.lock(); threads[i] = nil; lock.unlock()
                control.vcpuFinished()
            }
            t.name = "kvm-vcpu\(i)"
            t.start()
        }
    }

    func kickAll() {
        lock.lock()
        defer { lock.unlock() }
        for (v, t) in zip(vcpus, threads) { if let t { v.kick(thread: t) } }
    }

    private func runVCPU(_ i: Int, ram: GuestRAM, spec: WorkloadSpec, restored: Bool,
                         onRingFull: () throws(KVMError) -> Void) throws(KVMError) -> VCPURun {
        let vcpu = vcpus[i]
        let memory = ram.slots[0]   // the guest program's pages
        let start = monotonicNanos()
        var deadline = UInt64.max
        var part = spec
        switch spec.stop {
        case .count: break
        case let .duration(d):
            deadline = start + UInt64(d * 1e9)
            part.stop = .count(1 << 20)
        }
        var total = VCPURun()
        var chunkDone: UInt64 = 0     // accesses of the current chunk, from its progress exits
        var pacer = Pacer(start: start, deadline: deadline, rate: spec.rate)
        if !restored { try vcpu.loadWorkload(part, index: i, memory: memory, layout: ram.layout) }
        loop: while true {
            if control.stopRequested { break }
            if control.pauseRequested {
                control.parkWhilePaused()
                vcpu.clearKick()
                pacer.restartWindow()
                continue
            }
            let event = try vcpu.nextEvent(onRingFull: onRingFull)
            total.exits += 1
            switch event {
            case let .progress(n):
                chunkDone = n
            case .finished:
                let chunk = vcpu.guestCounters(index: i, memory: memory)
                total.accesses += chunk.accesses
                total.writes += chunk.writes
                chunkDone = 0
                if case .count = spec.stop { break loop }
                try vcpu.loadWorkload(part, index: i, memory: memory, layout: ram.layout, continuing: true)
            case .interrupted:
                break
            }
            let now = monotonicNanos()
            if now >= deadline { break }
            pacer.pace(now: now, done: total.accesses + chunkDone, control: control)
        }
        total.accesses += chunkDone
        total.mismatches = vcpu.guestCounters(index: i, memory: memory).mismatches   // the guest counts them as it goes
        total.nanoseconds = monotonicNanos() - start
        return total
    }
}

final class RunResults: @unchecked Sendable {
    private let lock = NSLock()
    private var results: [Result<VCPURun, KVMError>?]
    init(count: Int) { results = Array(repeating: nil, count: count) }
    func set(_ i: Int, _ r: Result<VCPURun, KVMError>) { lock.lock(); results[i] = r; lock.unlock() }
    var values: [Result<VCPURun, KVMError>?] { lock.lock(); defer { lock.unlock() }; return results }
}
