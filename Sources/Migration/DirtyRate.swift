import Foundation
import DirtyLog
import VirtualMachine

/// How fast a running guest dirties its memory, measured with the dirty log over a window in
/// steps (QEMU's calc-dirty-rate in its dirty-bitmap and dirty-ring modes).
public struct DirtyRateReport: Sendable {
    public struct Sample: Sendable {
        public var pages: Int
        public var seconds: Double
        /// Bytes dirtied per second in this step.
        public var rate: Double { Double(pages) * 4096 / seconds }
    }
    public var strategy: DirtyStrategy
    public var window: Double
    public var samples: [Sample] = []
    /// Pages dirtied at least once over the whole window.
    public var distinctPages = 0
    /// The mean of the steps' rates, in bytes per second.
    public var rate: Double { samples.isEmpty ? 0 : samples.reduce(0) { $0 + $1.rate } / Double(samples.count) }
}

/// Measures `vm`'s dirty rate: logging with `strategy` over `window` seconds in `steps` steps, each
/// step's pages counted by a get (which re-protects them). The VM must be running and not logging
/// already (a migration or a snapshot chain holds the log). Logging is off again afterwards, also
/// on failure. `onSample` sees each step as it ends; `cancellation` stops at the next step.
public func measureDirtyRate(_ vm: any VirtualMachine, window: Double, steps: Int, strategy: DirtyStrategy,
                             cancellation: Cancellation? = nil,
                             onSample: (DirtyRateReport.Sample) -> Void = { _ in }) throws -> DirtyRateReport {
    guard window > 0 && window <= 3600, (1...1000).contains(steps) else {
        throw MigrationError(.badOption, "a dirty-rate window is above 0 and at most 3600 s, in 1 to 1000 steps")
    }
    guard vm.runState == .running else { throw MigrationError.vm("the guest is \(vm.runState): measure the dirty rate of a running guest") }
    guard vm.dirtyLogMode == nil else {
        throw MigrationError.vm("the dirty log is in use (a migration or a snapshot chain): measure when it is done")
    }
    try vm.enableDirtyLogging(DirtyLogConfig(strategy: strategy))
    defer { try? vm.disableDirtyLogging() }
    var report = DirtyRateReport(strategy: strategy, window: window)
    var union = [UInt64](repeating: 0, count: vm.ram.bitmapWords)
    let step = window / Double(steps)
    for _ in 0..<steps {
        if cancellation?.isCancelled == true { throw MigrationError.cancelled }
        let t0 = Date()
        // In slices, so a cancel (a VM shutting down) need not wait out a long step.
        while Date().timeIntervalSince(t0) < step {
            if cancellation?.isCancelled == true { throw MigrationError.cancelled }
            Thread.sleep(forTimeInterval: min(0.02, step - Date().timeIntervalSince(t0)))
        }
        let log = try vm.getDirtyLog()
        let sample = DirtyRateReport.Sample(pages: log.reduce(0) { $0 + $1.nonzeroBitCount }, seconds: Date().timeIntervalSince(t0))
        for w in log.indices { union[w] |= log[w] }
        report.samples.append(sample)
        onSample(sample)
    }
    report.distinctPages = union.reduce(0) { $0 + $1.nonzeroBitCount }
    return report
}
