import Foundation
import GuestMemory
import Synchronization
import Workload

/// The vCPU threads of a background run: each runs the guest program in chunks of accesses (continuing
/// one stream), paces it to the spec's rate and the auto-converge throttle at its progress exits, and
/// parks when paused. Pause and stop kick the threads out of KVM_RUN.
public final class KVMRunner: Sendable {
    public let control: RunControl
    public let results: RunResults
    /// What the vCPUs run.
    public let spec: WorkloadSpec
    /// Each vCPU's thread while it runs, for kicks.
    private let threads: Mutex<[pthread_t?]>
    private let vcpus: [KVMVCPU]

    public init(vcpus: [KVMVCPU], ram: GuestRAM, spec: WorkloadSpec, restored: Bool, paused: Bool,
         onRingFull: @escaping @Sendable () throws(KVMError) -> Void) {
        self.vcpus = vcpus
        self.spec = spec
        control = RunControl(vcpus: vcpus.count, paused: paused)
        results = RunResults(count: vcpus.count)
        threads = Mutex(Array(repeating: nil, count: vcpus.count))
        for i in vcpus.indices {
            let t = Thread { [self] in
                KVMVCPU.allowKicksOnThisThread()
                threads.withLock { $0[i] = pthread_self() }
                do throws(KVMError) {
                    results.set(i, .success(try runVCPU(i, ram: ram, spec: spec, restored: restored, onRingFull: onRingFull)))
                } catch {
                    results.set(i, .failure(error))
                }
                threads.withLock { $0[i] = nil }
                control.vcpuFinished()
            }
            t.name = "kvm-vcpu\(i)"
            t.start()
        }
    }

    public func kickAll() {
        threads.withLock { threads in
            for (v, t) in zip(vcpus, threads) { if let t { v.kick(thread: t) } }
        }
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
        var pacer = Pacer(vcpu: i, start: start, deadline: deadline, rate: spec.rate)
        // A restored vCPU continues a chunk it began elsewhere, whose count includes what it did
        // there: those accesses (known to within one report interval at its first report) are
        // neither paced nor counted here.
        var carried: UInt64? = restored ? nil : 0
        let every = KVMVCPU.reportInterval(part)
        func sinceRestore(_ n: UInt64) -> UInt64 {
            if carried == nil { carried = n - min(n, every) }
            return n - min(n, carried!)
        }
        if !restored { try vcpu.loadWorkload(part, index: i, memory: memory, layout: ram.layout) }
        // The last run's stop left its kick set: every KVM_RUN would return at once.
        vcpu.clearKick()
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
                chunkDone = sinceRestore(n)
            case .finished:
                let chunk = vcpu.guestCounters(index: i, memory: memory)
                total.accesses &+= sinceRestore(chunk.accesses)
                total.writes &+= chunk.writes
                chunkDone = 0
                carried = 0
                if case .count = spec.stop { break loop }
                try vcpu.loadWorkload(part, index: i, memory: memory, layout: ram.layout, continuing: true)
            case .interrupted:
                break
            }
            let now = monotonicNanos()
            if now >= deadline { break }
            pacer.pace(now: now, done: total.accesses &+ chunkDone, control: control)
        }
        total.accesses &+= chunkDone
        total.mismatches = vcpu.guestCounters(index: i, memory: memory).mismatches   // the guest counts them as it goes
        total.nanoseconds = monotonicNanos() - start
        return total
    }
}

/// Each vCPU's result, as its thread ends.
public final class RunResults: Sendable {
    private let results: Mutex<[Result<VCPURun, KVMError>?]>
    init(count: Int) { results = Mutex(Array(repeating: nil, count: count)) }
    func set(_ i: Int, _ r: Result<VCPURun, KVMError>) { results.withLock { $0[i] = r } }
    public var values: [Result<VCPURun, KVMError>?] { results.withLock { $0 } }
}
