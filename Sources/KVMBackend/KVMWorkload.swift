import CVMMSys
import Foundation
import Glibc
import GuestMemory
import Workload

/// The guest program's parameter page, as guest/workload.c lays it out.
struct WorkloadParams {
    var magic: UInt64 = 0x314C_444B_574D_4D56   // "VMMWKLD1"
    var kind: UInt64
    var base: UInt64
    var workingSet: UInt64
    var pages: UInt64
    var writeThreshold: UInt64
    var offsetMask: UInt64
    var accessSize: UInt64
    var hotPages: UInt64
    var hotThreshold: UInt64
    var zipfTable: UInt64
    var count: UInt64
    var state: UInt64
    var seq: UInt64
    var reportEvery: UInt64
    var cursor: UInt64 = 0
    var done: UInt64 = 0
    var writes: UInt64 = 0
    var counterOffset: UInt64 = 0
    var mismatches: UInt64 = 0
}

/// What a guest workload run did.
public struct KVMRunStats: Sendable, Equatable {
    public init() {}
    public var accesses: UInt64 = 0
    public var writes: UInt64 = 0
    public var exits: UInt64 = 0
    public var nanoseconds: UInt64 = 0
    /// Counter-pattern checks that failed (cumulative over the runs continuing one stream).
    public var mismatches: UInt64 = 0
}

extension KVMVCPU {
    /// Loads the guest program and `spec`'s parameters for vCPU `index` into `memory` (slot at GPA 0),
    /// and points the vCPU at it in 64-bit CPL3 mode. `pagePass` instead writes one word into every
    /// page of the working set in order, `count` times in all (the dirty-log benchmark's pass).
    /// `continuing` resumes the stream where the previous run of the same spec on this vCPU stopped,
    /// for `spec`'s count: the program wrote its generator state back into its parameter page, so only
    /// the count and the entry registers change. The working set must lie at or above
    /// X86Layout.reservedEnd and inside RAM (its linear addresses, as `layout` places them: by default
    /// `memory` alone); the stop must be a count.
    public func loadWorkload(_ spec: WorkloadSpec, index: Int, memory: HostMemory, layout: RAMLayout? = nil,
                             pagePass: Bool = false, continuing: Bool = false) throws(KVMError) {
        let layout = layout ?? RAMLayout(size: memory.size)
        guard index < X86Layout.maxVCPUs else { throw .badWorkload("vCPU index \(index) beyond \(X86Layout.maxVCPUs)") }
        guard spec.base >= X86Layout.reservedEnd, spec.base.raw + spec.workingSet <= layout.size else {
            throw .badWorkload("working set \(spec.base)+\(formatBytes(spec.workingSet)) must lie in [1 MiB, \(formatBytes(layout.size))): the program's own pages sit below 1 MiB")
        }
        guard spec.base.raw + spec.workingSet <= X86Layout.maxGiB << 30 else {
            throw .badWorkload("the guest program maps the first \(X86Layout.maxGiB) GiB: the working set must end there")
        }
        guard case let .count(count) = spec.stop else {
            throw .badWorkload("the guest program runs a count of accesses, not a duration")
        }
        let mem = memory.pointer
        let params = X86Layout.params + UInt64(index) * 0x1000
        let stack = GPA(X86Layout.stackTop.raw - UInt64(index) * X86Layout.stackPerVCPU)
        if continuing {
            var p = (mem + Int(params.raw)).load(as: WorkloadParams.self)
            p.count = count
            withUnsafeBytes(of: &p) { (mem + Int(params.raw)).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            vm.recordWrite(params, length: UInt64(MemoryLayout<WorkloadParams>.size))
            try setEntryRegisters(entry: X86Layout.code, stack: stack, argument: params.raw)
            return
        }
        let gen = WorkloadGenerator(spec: spec, vcpu: index)
        GuestProgram.bytes.withUnsafeBytes {
            (mem + Int(X86Layout.code.raw)).copyMemory(from: $0.baseAddress!, byteCount: $0.count)
        }
        gen.zipfQuantiles.withUnsafeBytes {
            (mem + Int(X86Layout.zipfTable.raw)).copyMemory(from: $0.baseAddress!, byteCount: $0.count)
        }
        var p = WorkloadParams(kind: pagePass ? 4 : UInt64(gen.kindCode), base: spec.base.raw, workingSet: spec.workingSet,
                               pages: gen.pageCount, writeThreshold: gen.writeLimit, offsetMask: gen.accessOffsetMask,
                               accessSize: UInt64(spec.accessSize), hotPages: gen.hotPageCount, hotThreshold: gen.hotLimit,
                               zipfTable: X86Layout.zipfTable.raw, count: count, state: gen.initialState,
                               seq: UInt64(index) << 48, reportEvery: Self.reportInterval(spec), cursor: gen.initialCursor,
                               counterOffset: gen.counterOffset)
        withUnsafeBytes(of: &p) { (mem + Int(params.raw)).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        // The loader's stores are the VMM's writes: a logging slot must report them.
        vm.recordWrite(X86Layout.code, length: UInt64(GuestProgram.bytes.count))
        vm.recordWrite(X86Layout.zipfTable, length: UInt64(gen.zipfQuantiles.count * MemoryLayout<UInt32>.stride))
        vm.recordWrite(params, length: UInt64(MemoryLayout<WorkloadParams>.size))
        try enterLongModeUser(memory: memory, layout: layout, entry: X86Layout.code, stack: stack, argument: params.raw)
    }

    /// Accesses between progress exits: about a millisecond's worth at a limited rate (the VMM paces
    /// the guest at these exits), 65,536 at full speed.
    public static func reportInterval(_ spec: WorkloadSpec) -> UInt64 {
        spec.rate.map { min(1 << 16, max(16, $0 / 1000)) } ?? 1 << 16
    }

    /// The parameter page of vCPU `index`, as the guest program last wrote it.
    func params(index: Int, memory: HostMemory) -> WorkloadParams {
        (memory.pointer + Int((X86Layout.params + UInt64(index) * 0x1000).raw)).load(as: WorkloadParams.self)
    }

    /// The counters the guest program keeps in its parameter page (done and writes once a run ends;
    /// mismatches at any time).
    public func guestCounters(index: Int, memory: HostMemory) -> KVMRunStats {
        let p = params(index: index, memory: memory)
        var stats = KVMRunStats()
        stats.accesses = p.done
        stats.writes = p.writes
        stats.mismatches = p.mismatches
        return stats
    }

    /// What the guest program's last exit meant.
    public enum WorkloadEvent {
        /// Accesses made so far in this run (every `reportEvery`).
        case progress(UInt64)
        case finished
        /// A kick or a signal, or a full dirty ring already harvested.
        case interrupted
    }

    /// Runs the vCPU to its next exit and decodes it as the guest program's event; a full dirty ring
    /// calls `onRingFull` (which must harvest and reset the rings) and reads as interrupted.
    public func nextEvent(onRingFull: () throws(KVMError) -> Void) throws(KVMError) -> WorkloadEvent {
        let exit = try run()
        switch exit {
        case let .io(port: 0x10, write: true, _, data): return .progress(UInt64(UInt32(truncatingIfNeeded: data)))
        case .io(port: 0x11, write: true, _, _): return .finished
        case .interrupted: return .interrupted
        case .dirtyRingFull:
            try onRingFull()
            return .interrupted
        default: throw .unexpectedExit(exit.description, state: stateDump())
        }
    }

    /// Runs the loaded workload to completion. Progress exits come every 65,536 accesses; the run
    /// fails if it has not finished by `timeout` seconds (checked at each exit). A full dirty ring
    /// calls `onRingFull`, which must harvest and reset the rings.
    public func runWorkload(index: Int, memory: HostMemory, timeout: Double,
                            onRingFull: () throws(KVMError) -> Void = {}) throws(KVMError) -> KVMRunStats {
        var stats = KVMRunStats()
        let start = monotonicNanos()
        let deadline = start + UInt64(timeout * 1e9)
        // A watchdog kicks the vCPU out of KVM_RUN at the deadline, so even a guest that never exits
        // cannot outlast the timeout.
        // (Worker threads often block signals: let the kick through on this one while it runs.)
        var saved = KVMVCPU.allowKicksOnThisThread()
        let watchdog = Watchdog(vcpu: self, thread: pthread_self(), seconds: timeout)
        defer {
            watchdog.cancel()
            clearKick()
            pthread_sigmask(SIG_SETMASK, &saved, nil)
        }
        while true {
            let event = try nextEvent(onRingFull: onRingFull)
            stats.exits += 1
            if case .finished = event {
                let exits = stats.exits
                stats = guestCounters(index: index, memory: memory)
                stats.exits = exits
                stats.nanoseconds = monotonicNanos() - start
                return stats
            }
            if monotonicNanos() > deadline {
                throw .timedOut(seconds: timeout, state: stateDump())
            }
        }
    }
}

/// Kicks a vCPU thread out of KVM_RUN once a deadline passes, unless cancelled first.
final class Watchdog: @unchecked Sendable {   // `cancelled` under `cond`
    private let cond = NSCondition()
    private var cancelled = false

    init(vcpu: KVMVCPU, thread: pthread_t, seconds: Double) {
        let until = Date(timeIntervalSinceNow: seconds)
        Thread { [self] in
            cond.lock()
            while !cancelled { if !cond.wait(until: until) { break } }
            let fire = !cancelled
            cond.unlock()
            if fire { vcpu.kick(thread: thread) }
        }.start()
    }

    func cancel() {
        cond.lock()
        cancelled = true
        cond.signal()
        cond.unlock()
    }
}
