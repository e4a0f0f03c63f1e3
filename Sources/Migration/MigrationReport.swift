import Foundation
import GuestMemory
import DirtyLog
import Synchronization
import VirtualMachine

/// What a migration did.
public struct MigrationReport: Sendable, CustomStringConvertible {
    public var totalSeconds = 0.0
    public var setupSeconds = 0.0
    /// From pausing the source to the destination's answer.
    public var downtimeSeconds = 0.0
    /// Where the downtime went, in order: the pause, the last harvest, the last pass, the state
    /// (and END), the destination's check and load (END to READY), and the handover (READY to
    /// RUNNING).
    public var downtimeParts: [(name: String, seconds: Double)] = []
    public var bytesSent: UInt64 = 0
    public var pagesSent: UInt64 = 0
    public var zeroPages: UInt64 = 0
    public var iterations = 0
    public var converged = false
    /// The highest auto-converge throttle applied, in percent of vCPU time.
    public var throttlePercent = 0
    public var bandwidth = 0.0   // bytes per second, measured
    /// Every pre-copy pass, in order.
    public var passes: [PassRecord] = []
    /// Set when the migration switched to post-copy.
    public var postcopy: PostcopyReport?
    /// What the guest really dirtied while logged, in bytes per second: pages new to the log per
    /// second of the passes.
    public var dirtyRate: Double {
        let span = passes.reduce(0) { $0 + $1.seconds }
        return span > 0 ? passes.reduce(0) { $0 + $1.dirtyRate * $1.seconds } / span : 0
    }
    public init() {}

    public var description: String {
        String(format: "total %.0f ms, downtime %.0f ms, setup %.1f ms, %@ sent (%llu pages, %llu zero), %d iterations, %@, %.0f MiB/s",
               totalSeconds * 1e3, downtimeSeconds * 1e3, setupSeconds * 1e3, formatBytes(bytesSent), pagesSent, zeroPages,
               iterations, converged ? "converged" : "iteration limit", bandwidth / Double(1 << 20))
            + (throttlePercent > 0 ? ", throttled to \(100 - throttlePercent)%" : "")
            + (postcopy.map { String(format: ", post-copy after pass %d: %llu pages in %.0f ms, %llu asked for in %llu requests", $0.afterPass, $0.pages,
                                     $0.seconds * 1e3, $0.requestedPages, $0.requests) } ?? "")
    }
}
