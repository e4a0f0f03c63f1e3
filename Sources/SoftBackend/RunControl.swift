import Foundation
import Synchronization

/// Start, pause, resume and stop for a set of vCPU threads. vCPUs poll the flags at safe points
/// (every batch of accesses) and park outside guest mode while paused.
public final class RunControl: @unchecked Sendable {
    private let pause = Atomic<Bool>(false)
    private let stop = Atomic<Bool>(false)
    private let cond = NSCondition()
    private var parked = 0
    private var finished = 0
    private let vcpuCount: Int

    public init(vcpus: Int) { vcpuCount = vcpus }

    private let throttle = Atomic<Int>(0)

    public var pauseRequested: Bool { pause.load(ordering: .relaxed) }

    /// Percent of the time vCPUs sleep (0 = full speed): a migration's auto-converge.
    public var throttlePercent: Int {
        get { throttle.load(ordering: .relaxed) }
        set { throttle.store(min(99, max(0, newValue)), ordering: .relaxed) }
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
