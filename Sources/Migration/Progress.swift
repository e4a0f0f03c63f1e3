import Foundation
import GuestMemory

/// Where a migration stands, reported to a progress callback on either end: often while pages move
/// (about ten times a second), and at every change of phase or iteration.
public struct MigrationProgress: Sendable {
    public enum Phase: String, Sendable {
        case setup, precopy = "pre-copy", stopAndCopy = "stop-and-copy", postcopy = "post-copy", receiving, verifying, done
    }
    public var phase: Phase = .setup
    /// The source's pass over memory: 1 is the full first pass, later ones send what was dirtied.
    public var iteration = 0
    /// Pages the current pass sends, and how many of them are sent.
    public var pagesPlanned: UInt64 = 0
    public var pagesDone: UInt64 = 0
    /// Bytes sent (source) or received (destination) so far.
    public var bytes: UInt64 = 0
    /// Bytes per second, the latest measurement.
    public var bandwidth = 0.0
    /// The source's estimate of the pause if it stopped now: dirty bytes left / bandwidth.
    public var expectedDowntime = 0.0
    public var throttlePercent = 0
    /// Something that happened (a throttle step, the digest checked), worth a line of its own.
    public var event: String?
    /// The source's pre-copy passes so far.
    public var passes: [PassRecord] = []

    public init() {}

    public var percent: Double { pagesPlanned == 0 ? 100 : Double(pagesDone) * 100 / Double(pagesPlanned) }
    public var remainingBytes: UInt64 { (pagesPlanned - min(pagesDone, pagesPlanned)) << 12 }

    /// One line for a terminal.
    public var line: String {
        let rate = String(format: "%.0f MiB/s", bandwidth / 1_048_576)
        switch phase {
        case .receiving:
            return "receiving: \(formatBytes(bytes)) in, \(rate)"
        case .verifying, .done, .setup:
            return phase.rawValue + (event.map { ": " + $0 } ?? "")
        case .postcopy:
            return String(format: "post-copy: %3.0f%% of %@ pushed, %@", percent, formatBytes(pagesPlanned << 12), rate)
                + (event.map { "; " + $0 } ?? "")
        case .precopy, .stopAndCopy:
            var s = String(format: "%@ iteration %d: %3.0f%% of %@ sent, %@, %@ left, expected downtime %.0f ms",
                           phase.rawValue, iteration, percent, formatBytes(pagesPlanned << 12), rate,
                           formatBytes(remainingBytes), expectedDowntime * 1e3)
            if bandwidth > 0 { s += ", pass ETA " + formatDuration(Double(remainingBytes) / bandwidth) }
            if throttlePercent > 0 { s += ", vCPUs throttled to \(100 - throttlePercent)%" }
            return s
        }
    }
}

/// One pre-copy pass, as it went.
public struct PassRecord: Sendable, Equatable {
    public var pass: Int
    public var pages: UInt64
    public var bytes: UInt64
    public var seconds: Double
    /// What the guest dirtied while the pass went, in bytes per second.
    public var dirtyRate: Double
    /// The pause this pass left, had the source stopped after it.
    public var expectedDowntime: Double
    /// The auto-converge throttle during the pass, in percent of vCPU time.
    public var throttlePercent: Int
    public init(pass: Int, pages: UInt64, bytes: UInt64, seconds: Double, dirtyRate: Double, expectedDowntime: Double, throttlePercent: Int) {
        self.pass = pass
        self.pages = pages
        self.bytes = bytes
        self.seconds = seconds
        self.dirtyRate = dirtyRate
        self.expectedDowntime = expectedDowntime
        self.throttlePercent = throttlePercent
    }

    static let csvHeader = "pass,pages,bytes,seconds,dirty_bytes_per_second,expected_downtime_ms,throttle_percent"
    var csvLine: String {
        String(format: "%d,%llu,%llu,%.6f,%.0f,%.3f,%d", pass, pages, bytes, seconds, dirtyRate, expectedDowntime * 1e3, throttlePercent)
    }
}

/// Hands progress to a caller's callback: at once for an event or a change of phase, otherwise at
/// most ten times a second. `status` is the report being built up.
final class ProgressReporter: @unchecked Sendable {   // `status` and `last` under `lock`; the callback under `callbackLock`
    private var status = MigrationProgress()
    private let callback: ((MigrationProgress) -> Void)?
    private var last: UInt64 = 0
    /// Reports can come from more than one thread (the destination's door reports what it refused).
    private let lock = NSLock()
    private let callbackLock = NSLock()

    init(_ callback: ((MigrationProgress) -> Void)?) { self.callback = callback }

    func update(_ body: (inout MigrationProgress) -> Void) {
        lock.lock()
        body(&status)
        lock.unlock()
    }

    /// `rateSince`: also set the bandwidth, as bytes over the time since then.
    func report(bytes: UInt64? = nil, event: String? = nil, force: Bool = true, rateSince: UInt64? = nil) {
        guard let callback else { return }
        lock.lock()
        let now = monotonicNanos()
        guard force || now &- last >= 100_000_000 else { lock.unlock(); return }
        last = now
        if let bytes {
            if let rateSince { status.bandwidth = Double(bytes) / (Double(max(now - rateSince, 1)) / 1e9) }
            status.bytes = bytes
        }
        status.event = event
        let copy = status
        lock.unlock()
        // One callback at a time, whichever thread reports.
        callbackLock.lock()
        callback(copy)
        callbackLock.unlock()
    }
}

/// A duration for a person: 850 ms, 12.3 s, 4 min 10 s, 2 h 5 min.
func formatDuration(_ s: Double) -> String {
    guard s.isFinite else { return "never" }
    if s < 1 { return String(format: "%.0f ms", s * 1e3) }
    if s < 60 { return String(format: "%.1f s", s) }
    if s < 3600 { return "\(Int(s) / 60) min \(Int(s) % 60) s" }
    return "\(Int(s) / 3600) h \(Int(s) % 3600 / 60) min"
}
