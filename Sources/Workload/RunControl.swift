import Foundation
import GuestMemory
import Synchronization

/// Start, pause, resume and stop for a set of vCPU threads. vCPUs poll the flags at safe points
/// (every batch of accesses) and park outside guest mode while paused.
public final class RunControl: @unchecked Sendable {   // counters under `cond`; flags atomic
    private let pause = Atomic<Bool>(false)
    private let stop = Atomic<Bool>(false)
    private let cond = NSCondition()
    private var parked = 0
    private var finished = 0
    private let vcpuCount: Int

    /// `paused`: the vCPUs park before their first access until `resumeAll` (a migrated guest waiting
    /// for the source to hand it over).
    public init(vcpus: Int, paused: Bool = false) {
        vcpuCount = vcpus
        pause.store(paused, ordering: .relaxed)
        vcpuThrottles = .allocate(capacity: max(1, vcpus))
        for i in 0..<vcpus { (vcpuThrottles + i).initialize(to: Atomic(0)) }
    }

    deinit {
        vcpuThrottles.deinitialize(count: vcpuCount)
        vcpuThrottles.deallocate()
    }

    // Throttles in per mille: a vCPU held to a few percent of its time needs finer steps than 1%.
    private let throttle = Atomic<Int>(0)
    private let vcpuThrottles: UnsafeMutablePointer<Atomic<Int>>
    public static let maxThrottle = 990

    public var pauseRequested: Bool { pause.load(ordering: .relaxed) }

    /// Percent of the time every vCPU sleeps (0 = full speed, at most 99): a migration's auto-converge.
    public var throttlePercent: Int {
        get { throttle.load(ordering: .relaxed) / 10 }
        set { throttle.store(min(Self.maxThrottle, max(0, newValue * 10)), ordering: .relaxed) }
    }

    /// Percent of the time vCPU `vcpu` alone sleeps (to 0.1%, at most 99: a dirty limit's throttle),
    /// or with `vcpu` nil every vCPU (in whole percent: auto-converge).
    public func setThrottle(percent: Double, vcpu: Int?) {
        guard let vcpu else { throttlePercent = Int(percent); return }
        precondition(vcpu >= 0 && vcpu < vcpuCount, "vCPU \(vcpu) of \(vcpuCount)")
        let perMille = percent.isFinite ? Int((percent * 10).rounded()) : 0
        vcpuThrottles[vcpu].store(min(Self.maxThrottle, max(0, perMille)), ordering: .relaxed)
    }

    /// Per mille of its time vCPU `vcpu` sleeps: the larger of the VM's throttle and its own.
    @inline(__always)
    public func throttlePerMille(vcpu: Int) -> Int {
        max(throttle.load(ordering: .relaxed), vcpu < vcpuCount ? vcpuThrottles[vcpu].load(ordering: .relaxed) : 0)
    }
    public var stopRequested: Bool { stop.load(ordering: .relaxed) }

    /// Called by a vCPU that saw `pauseRequested`: waits, outside guest mode, until resumed or stopped.
    public func parkWhilePaused() {
        cond.lock()
        parked += 1
        cond.broadcast()
        while pause.load(ordering: .acquiring) && !stop.load(ordering: .acquiring) { cond.wait() }
        parked -= 1
        cond.unlock()
    }

    /// Sleeps up to `nanoseconds` (rate limiting), waking early for pause or stop.
    public func sleep(nanoseconds: UInt64) {
        cond.lock()
        if !pause.load(ordering: .acquiring) && !stop.load(ordering: .acquiring) {
            _ = cond.wait(until: Date(timeIntervalSinceNow: Double(nanoseconds) / 1e9))
        }
        cond.unlock()
    }

    public func vcpuFinished() {
        cond.lock()
        finished += 1
        cond.broadcast()
        cond.unlock()
    }

    /// Asks every vCPU to pause and waits until all running ones are parked. False on timeout
    /// (the vCPUs are left asked to pause). `kick` gets vCPUs out of guest mode once the flag is up
    /// (KVM's vCPUs only look at it between runs).
    public func pauseAll(timeout: Double, kick: () -> Void = {}) -> Bool {
        pause.store(true, ordering: .releasing)
        kick()
        cond.lock()
        defer { cond.unlock() }
        cond.broadcast()
        let until = Date(timeIntervalSinceNow: timeout)
        while parked + finished < vcpuCount {
            if !cond.wait(until: until) { return parked + finished >= vcpuCount }
        }
        return true
    }

    public func resumeAll() {
        cond.lock()
        pause.store(false, ordering: .releasing)
        cond.broadcast()
        cond.unlock()
    }

    public func stopAll(kick: () -> Void = {}) {
        cond.lock()
        stop.store(true, ordering: .releasing)
        cond.broadcast()
        cond.unlock()
        kick()
    }

    /// Waits until every vCPU thread has finished. False on timeout.
    public func waitFinished(timeout: Double) -> Bool {
        cond.lock()
        defer { cond.unlock() }
        let until = Date(timeIntervalSinceNow: timeout)
        while finished < vcpuCount {
            if !cond.wait(until: until) { return finished >= vcpuCount }
        }
        return true
    }

    public var pausedCount: Int { cond.lock(); defer { cond.unlock() }; return parked }
}

/// A vCPU's pacing between batches of accesses, for both backends' vCPU loops: the throttle (the
/// VM's auto-converge or the vCPU's dirty limit: after each millisecond run, sleep so the vCPU runs
/// only (100 - p)% of the time) and the workload's rate (accesses per second, counted from `firstAccess`, a continued stream's start).
/// Time the throttle takes moves the rate's schedule on, so a throttle slows a paced guest by its
/// share; and a vCPU that falls behind otherwise (descheduled, just restored) catches up at most
/// `maxBacklog` of it, so it does not burst.
public struct Pacer {
    public static let maxBacklog: UInt64 = 10_000_000   // ns
    private var start: UInt64
    private let deadline: UInt64
    private let nanosPerAccess: Double?
    private let firstAccess: UInt64
    private var window: UInt64
    private let vcpu: Int

    public init(vcpu: Int = 0, start: UInt64, deadline: UInt64, rate: UInt64?, firstAccess: UInt64 = 0) {
        self.vcpu = vcpu
        self.start = start
        self.deadline = deadline
        nanosPerAccess = rate.map { 1e9 / Double($0) }
        self.firstAccess = firstAccess
        window = start
    }

    /// Sleeps what is owed at `now` with `done` accesses made; `around` brackets each sleep (a soft
    /// vCPU leaves guest mode for it). Sleeps end early for pause or stop.
    @inline(__always)
    public mutating func pace(now: UInt64, done: UInt64, control: RunControl, around: (() -> Void) -> Void = { $0() }) {
        let p = control.throttlePerMille(vcpu: vcpu)
        if p > 0, now - window >= 1_000_000 {
            around { control.sleep(nanoseconds: (now - window) * UInt64(p) / UInt64(1000 - p)) }
            window = monotonicNanos()
            // The throttle's time is not owed back: the rate's schedule moves on by it.
            start &+= window - now
        } else if p == 0 {
            window = now
        }
        if let nanosPerAccess {
            let due = start &+ UInt64(Double(done &- firstAccess) * nanosPerAccess)
            if due > now {
                around { control.sleep(nanoseconds: min(due - now, deadline &- now)) }
            } else if now - due > Self.maxBacklog {
                start &+= now - due - Self.maxBacklog
            }
        }
    }

    /// Time parked is not run time: the throttle's window starts again.
    public mutating func restartWindow() { window = monotonicNanos() }
}
