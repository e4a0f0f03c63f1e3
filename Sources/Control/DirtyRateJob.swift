import DirtyLog
import Foundation
import Migration
import Synchronization

/// A dirty-rate measurement of the running guest, as `query-dirty-rate` reports it.
final class DirtyRateJob: Sendable {
    /// QMP's dirty-rate statuses.
    enum Status: String { case measuring, measured, failed }

    let strategy: DirtyStrategy
    let window: Double
    let cancellation = Cancellation()
    /// Opens when it finishes.
    let ended = Latch()
    private struct State {
        var status = Status.measuring
        var samples: [DirtyRateReport.Sample] = []
        var report: DirtyRateReport?
        var error: String?
    }
    private let state = Mutex(State())
    private let started = Date()

    init(strategy: DirtyStrategy, window: Double) {
        self.strategy = strategy
        self.window = window
    }

    var status: Status { state.withLock { $0.status } }
    func add(_ sample: DirtyRateReport.Sample) { state.withLock { $0.samples.append(sample) } }
    func finish(_ result: Result<DirtyRateReport, Error>) {
        state.withLock { s in
            switch result {
            case let .success(r): s.report = r; s.status = .measured
            case let .failure(e): s.error = "\(e)"; s.status = .failed
            }
        }
        ended.release()
    }

    /// The mean rate in MiB/s, once measured.
    var rate: Double? { state.withLock { $0.report.map { $0.rate / 1_048_576 } } }

    var json: JSON {
        let s = state.withLock { $0 }
        do {
            var pairs: [(String, JSON)] = [("status", .string(s.status.rawValue)), ("start-time", .int(Int64(started.timeIntervalSince1970))),
                                           ("calc-time-ms", .int(Int64(window * 1e3))), ("mode", .string(strategy.rawValue))]
            if let report = s.report {
                pairs.append(("dirty-rate", .double((report.rate / 1_048_576 * 10).rounded() / 10)))
                pairs.append(("distinct-pages", .int(Int64(report.distinctPages))))
            }
            pairs.append(("samples", .array(s.samples.map { .object([("pages", .int(Int64($0.pages))), ("duration-ms", .int(Int64($0.seconds * 1e3))),
                                                                    ("dirty-rate", .double(($0.rate / 1_048_576 * 10).rounded() / 10))]) })))
            if let error = s.error { pairs.append(("error-desc", .string(error))) }
            return .object(pairs)
        }
    }
}
