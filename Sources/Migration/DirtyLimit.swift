import Foundation
import DirtyLog
import GuestMemory
import VirtualMachine

/// QEMU's dirty limit: caps how fast each vCPU dirties memory by throttling only the vCPUs that go
/// over their limit, so a migration of a guest with one busy vCPU converges without slowing the rest.
///
/// Every `period` the limiter reads how many pages each vCPU pushed to its dirty ring (the VM must
/// log with the ring: the limiter turns ring logging on for itself while nothing else logs, and
/// measures through the log of whoever borrowed it, as long as that logs with the ring) and moves
/// each limited vCPU's throttle so its rate heads for 80% of its limit. A vCPU under its limit
/// gets its time back the same way. Rates are smoothed over periods (half the last, half the
/// rest): a throttled KVM vCPU runs and sleeps in bursts longer than a period's slice of time.
public final class DirtyLimiter: @unchecked Sendable {   // its per-vCPU state under its lock; one thread adjusts throttles
    /// One vCPU as the limiter sees it.
    public struct VCPU: Sendable {
        public var index: Int
        /// Bytes per second, or nil if this vCPU is not limited.
        public var limit: Double?
        /// Bytes dirtied per second over the last period.
        public var rate: Double
        /// Percent of its time the vCPU sleeps.
        public var throttle: Double
    }

    public let period: Double
    private let vm: any VirtualMachine
    // Guards everything below; the VM's logging changes only under it, so a borrower and a tick
    // never race to turn logging on.
    private let lock = NSCondition()
    private var limits: [Double?]
    private var rates: [Double]
    private var throttles: [Double]
    private var last: (counts: [UInt64], at: UInt64)?
    private var ownsLog = false
    private var borrowers = 0
    private var running = false
    private var stopped = false
    private var lastError: String?

    public init(vm: any VirtualMachine, period: Double = 0.5) {
        self.vm = vm
        self.period = period
        limits = Array(repeating: nil, count: vm.vcpuCount)
        rates = Array(repeating: 0, count: vm.vcpuCount)
        throttles = Array(repeating: 0, count: vm.vcpuCount)
    }

    /// Whether the VM can be limited at all: its backend must offer the ring now (KVM only if its
    /// vCPUs were made with rings, as QEMU's dirty limit needs `dirty-ring-size`).
    public static func check(_ vm: any VirtualMachine) throws {
        guard vm.capabilities.strategies.contains(.ring) else {
            throw MigrationError.vm("a dirty limit measures each vCPU with the dirty ring, which this host's KVM lacks")
        }
        guard vm.backend != .kvm || vm.defaultDirtyStrategy == .ring else {
            throw MigrationError.vm("on kvm a dirty limit needs the dirty ring, which is chosen before the vCPUs first run: start the VM with a dirty ring (vmm start --dirty-ring; a guest that came by migration or from a snapshot runs without one)")
        }
    }

    /// Limits vCPU `vcpu` (nil: every vCPU) to `bytesPerSecond`, or lifts its limit (nil).
    public func setLimit(_ bytesPerSecond: Double?, vcpu: Int?) throws {
        if let vcpu, !(0..<limits.count).contains(vcpu) {
            throw MigrationError(.badOption, "cpu-index \(vcpu): this VM has vCPUs 0 to \(limits.count - 1)")
        }
        if let b = bytesPerSecond, !(b >= 1 && b <= Double(1 << 50)) {
            throw MigrationError(.badOption, "a dirty limit is 1 byte to 2^50 bytes per second")
        }
        if bytesPerSecond != nil {
            try Self.check(vm)
            if let mode = vm.dirtyLogMode, mode.strategy != .ring {
                throw MigrationError.vm("the dirty log is held by a user logging with \(mode.strategy) (a migration, a snapshot chain or a measurement), which does not count pages per vCPU: set the limit before it starts, or after it ends")
            }
        }
        try lock.withLock {
            guard !stopped else { throw MigrationError.vm("the dirty limits ended with the guest here") }
            for i in vcpu.map({ [$0] }) ?? Array(limits.indices) {
                limits[i] = bytesPerSecond
                if bytesPerSecond == nil { throttles[i] = 0; vm.setThrottle(percent: 0.0, vcpu: i) }
            }
            if !running && limits.contains(where: { $0 != nil }) {
                running = true
                let t = Thread { [self] in loop() }
                t.name = "dirty-limit"
                t.start()
            }
        }
    }

    /// Every vCPU: its limit, its latest rate and its throttle.
    public var vcpus: [VCPU] {
        lock.withLock { limits.indices.map { VCPU(index: $0, limit: limits[$0], rate: rates[$0], throttle: throttles[$0]) } }
    }

    /// Whether any vCPU is limited.
    public var isActive: Bool { lock.withLock { limits.contains { $0 != nil } } }

    /// Why the last period measured nothing, if it did not.
    public var problem: String? { lock.withLock { lastError } }

    /// Hands the dirty log to another user (a migration, a snapshot chain, a measurement), which
    /// turns logging on for itself: the limiter's own logging goes off and stays off until
    /// `giveBack`, and meanwhile the limiter measures through the borrower's ring, if it logs with one.
    public func lendLog() {
        lock.withLock {
            if ownsLog { try? vm.disableDirtyLogging(); ownsLog = false }
            borrowers += 1
            last = nil
        }
    }

    /// A borrower is done with the dirty log (and turned its logging off).
    public func giveBack() {
        lock.withLock {
            borrowers = max(0, borrowers - 1)
            last = nil
        }
    }

    /// Lifts every limit and stops; logging it turned on goes off. Waits for its thread.
    public func stop() {
        lock.withLock {
            stopped = true
            limits = Array(repeating: nil, count: limits.count)
            lock.broadcast()
            while running { lock.wait() }
        }
    }

    private func loop() {
        lock.lock()
        defer {
            for i in throttles.indices where throttles[i] > 0 { vm.setThrottle(percent: 0.0, vcpu: i) }
            throttles = Array(repeating: 0, count: throttles.count)
            rates = Array(repeating: 0, count: rates.count)
            if ownsLog { try? vm.disableDirtyLogging(); ownsLog = false }
            last = nil
            running = false
            lock.broadcast()
            lock.unlock()
        }
        while !stopped && limits.contains(where: { $0 != nil }) {
            do { try tick() } catch { lastError = "\(error)"; last = nil }
            _ = lock.wait(until: Date(timeIntervalSinceNow: period))
        }
    }

    /// One period: counts, rates, throttles. The caller holds `lock`.
    private func tick() throws {
        if vm.dirtyLogMode == nil && borrowers == 0 {
            try vm.enableDirtyLogging(DirtyLogConfig(strategy: .ring))
            ownsLog = true
            last = nil
        }
        guard vm.dirtyLogMode?.strategy == .ring else {
            lastError = borrowers > 0 ? "the dirty log is borrowed by a user that does not log with the ring" : nil
            last = nil
            return
        }
        guard vm.runState == .running else { last = nil; return }
        let counts = try vm.dirtyRingCounts(), now = monotonicNanos()
        lastError = nil
        defer { last = (counts, now) }
        guard let last, counts.count == rates.count else { return }
        let seconds = Double(now - last.at) / 1e9
        for i in rates.indices {
            let rate = Double(counts[i] &- last.counts[i]) * 4096 / seconds
            rates[i] = rates[i] == 0 ? rate : (rates[i] + rate) / 2
            guard let limit = limits[i] else { continue }
            throttles[i] = Self.throttle(rate: rates[i], limit: limit, current: throttles[i])
            // Set every period: a guest started again (a new workload) starts unthrottled.
            vm.setThrottle(percent: throttles[i], vcpu: i)
        }
    }

    /// The throttle (percent of its time a vCPU sleeps) that brings `rate` to 80% of `limit`,
    /// assuming a vCPU dirties in proportion to the time it runs. Within 65-90% of the limit it
    /// stays (the margin covers the noise of a period's count); each step moves the vCPU's share of
    /// time by at most a factor of 4 down or 2 up, so one odd period does not swing it.
    static func throttle(rate: Double, limit: Double, current: Double) -> Double {
        if rate >= 0.65 * limit && rate <= 0.9 * limit { return current }
        let share = (100 - current) / 100
        var next = rate > 0 ? share * 0.8 * limit / rate : 1
        next = min(min(1, share * 2), max(share / 4, next))
        return min(99, max(0, 100 * (1 - next)))
    }
}
