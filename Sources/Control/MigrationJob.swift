import Foundation
import Migration
import Synchronization
import VirtualMachine

/// One outgoing or incoming migration as the control socket reports it (`query-migrate`): its
/// status, the progress and pass history so far, and how it ended.
final class MigrationJob: Sendable {
    /// QMP's migration statuses.
    enum Status: String { case setup, active, postcopyActive = "postcopy-active", completed, failed, cancelled }

    let cancellation = Cancellation()
    /// Opens when it finishes.
    let ended = Latch()
    let incoming: Bool
    /// An outgoing migration's connections and timeout (a change of its bandwidth is checked against
    /// them); not the whole options, which hold the key.
    let limits: (connections: Int, timeout: Double)?
    private struct State {
        var status = Status.setup
        var progress = MigrationProgress()
        var report: MigrationReport?
        var error: String?
        var finished: Date?
    }
    private let state = Mutex(State())
    private let started = Date()
    private let totalBytes: UInt64

    init(incoming: Bool, totalBytes: UInt64, options: MigrationOptions? = nil) {
        self.incoming = incoming
        limits = options.map { ($0.connections, $0.timeout) }
        self.totalBytes = totalBytes
    }

    var status: Status { state.withLock { $0.status } }
    var isActive: Bool { [.setup, .active, .postcopyActive].contains(status) }

    /// Takes a progress report; returns the passes it completed since the last one.
    func update(_ p: MigrationProgress) -> (Status?, [PassRecord]) {
        state.withLock { s in
            let newPasses = Array(p.passes.dropFirst(s.progress.passes.count))
            s.progress = p
            if s.status == .setup && (p.phase != .setup || p.bytes > 0) {
                s.status = .active
                return (.active, newPasses)
            }
            // The guest runs on the destination now, its pages following (QMP's postcopy-active).
            if s.status == .active && p.phase == .postcopy {
                s.status = .postcopyActive
                return (.postcopyActive, newPasses)
            }
            return (nil, newPasses)
        }
    }

    func finish(_ status: Status, report: MigrationReport? = nil, error: String? = nil) {
        state.withLock { s in
            s.status = status
            s.report = report
            s.error = error
            s.finished = Date()
        }
        ended.release()
    }

    /// query-migrate's answer.
    var json: JSON {
        let s = state.withLock { $0 }
        let (progress, report) = (s.progress, s.report)
        do {
            let end = s.finished ?? Date()
            var pairs: [(String, JSON)] = [
                ("status", .string(s.status.rawValue)),
                ("incoming", .bool(incoming)),
                ("total-time", .int(Int64(end.timeIntervalSince(started) * 1e3))),
            ]
            let passes = report?.passes ?? progress.passes
            let bandwidth = report?.bandwidth ?? progress.bandwidth
            if !incoming {
                pairs.append(("expected-downtime", .int(Int64(progress.expectedDowntime * 1e3))))
                pairs.append(("pass", .int(Int64(progress.iteration))))
                pairs.append(("throttle-percent", .int(Int64(report?.throttlePercent ?? progress.throttlePercent))))
            }
            if let report {
                pairs.append(("setup-time", .int(Int64(report.setupSeconds * 1e3))))
                pairs.append(("downtime", .int(Int64(report.downtimeSeconds * 1e3))))
                if let p = report.postcopy {
                    pairs.append(("postcopy", .object([("after-pass", .int(Int64(p.afterPass))), ("pages", .int(Int64(p.pages))),
                                                       ("requests", .int(Int64(p.requests))), ("requested-pages", .int(Int64(p.requestedPages))),
                                                       ("time", .int(Int64(p.seconds * 1e3)))])))
                }
            }
            pairs.append(("ram", .object([
                ("transferred", .int(Int64(report?.bytesSent ?? progress.bytes))),
                ("remaining", .int(Int64(s.status == .completed ? 0 : progress.remainingBytes))),
                ("total", .int(Int64(totalBytes))),
                ("mbps", .double((bandwidth * 8 / 1e6 * 10).rounded() / 10)),
            ])))
            pairs.append(("passes", .array(passes.map(\.json))))
            if let error = s.error { pairs.append(("error-desc", .string(error))) }
            return .object(pairs)
        }
    }
}

extension PassRecord {
    var json: JSON {
        .object([("pass", .int(Int64(pass))), ("pages", .int(Int64(pages))), ("bytes", .int(Int64(bytes))),
                 ("duration", .int(Int64(seconds * 1e3))), ("dirty-rate", .int(Int64(dirtyRate))),
                 ("expected-downtime", .int(Int64(expectedDowntime * 1e3))), ("throttle-percent", .int(Int64(throttlePercent)))])
    }
}
