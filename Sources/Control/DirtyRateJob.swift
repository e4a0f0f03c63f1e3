import DirtyLog
import Foundation
import Migration

/// A dirty-rate measurement of the running guest, as `query-dirty-rate` reports it.
final class DirtyRateJob: @unchecked Sendable {
    /// QMP's dirty-rate statuses.
    enum Status: String { case measuring, measured, failed }

    let strategy: DirtyStrategy
    let window: Double
    let cancellation = Cancellation()
    private let lock = NSLock()
    private var _status = Status.measuring
    private var samples: [DirtyRateReport.Sample] = []
    private var report: DirtyRateReport?
    private var error: String?
    private let started = Date()

    init(strategy: DirtyStrategy, window: Double) {
        self.strategy = strategy
        self.window = window
    }

    var status: Status { lock.withLock { _status } }
    func add(_ s: DirtyRateReport.Sample) { lock.withLock { samples.append(s) } }
    func finish(_ result: Result<DirtyRateReport, Error>) {
        lock.withLock {
            switch result {
            case let .success(r): report = r; _status = .measured
            case let .failure(e): error = "\(e)"; _status = .failed
            }
        }
    }

    /// The mean rate in MiB/s, once measured.
    var rate: Double? { lock.withLock { report.map { $0.rate / 1_048_576 } } }

    var json: JSON {
        lock.withLock {
            var pairs: [(String, JSON)] = [("status", .string(_status.rawValue)), ("start-time", .int(Int64(started.timeIntervalSince1970))),
                                           ("calc-time-ms", .int(Int64(window * 1e3))), ("mode", .string(strategy.rawValue))]
            if let report {
                pairs.append(("dirty-rate", .double((report.rate / 1_048_576 * 10).rounded() / 10)))
                pairs.append(("distinct-pages", .int(Int64(report.distinctPages))))
            }
            pairs.append(("samples", .array(samples.map { .object([("pages", .int(Int64($0.pages))), ("duration-ms", .int(Int64($0.seconds * 1e3))),
                                                                    ("dirty-rate", .double(($0.rate / 1_048_576 * 10).rounded() / 10))]) })))
            if let error { pairs.append(("error-desc", .string(error))) }
            return .object(pairs)
        }
    }
}
