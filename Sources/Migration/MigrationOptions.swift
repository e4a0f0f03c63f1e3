import Foundation
import GuestMemory
import DirtyLog
import Synchronization
import VirtualMachine

/// What a migration does when pre-copy reaches its pass limit with the pause still over the downtime limit.
public enum Convergence: String, Sendable, CaseIterable {
    /// Stop, tell the destination, and keep the guest running here.
    case cancel
    /// Switch over anyway, and report the downtime it took.
    case force
    /// Switch to post-copy as soon as another pass would not bring the pause within the limit: the
    /// guest runs on the destination at once, and its pages follow as it touches them.
    case postcopy
}

/// How the source migrates.
public struct MigrationOptions: Sendable {
    /// Stop iterating once the pages left would take less than this to send (seconds).
    public var downtimeLimit: Double = 0.3
    /// Or after this many iterations over dirtied pages; then `convergence` decides.
    public var maxIterations: Int = 30
    public var convergence: Convergence = .cancel
    /// Values a controller may change while the migration runs; read at every pass (nil: fixed).
    public var tuning: MigrationTuning?
    /// Socket timeout for every send and receive.
    public var timeout: Double = 30
    /// The pre-shared key; nil sends an unauthenticated stream.
    public var key: MigrationKey?
    /// Bytes per second at most, over all channels (nil: unlimited).
    public var maxBandwidth: Double?
    /// TCP connections carrying page data (multifd); the first also carries the rest of the stream.
    public var channels: Int
    /// The connections to open to the destination: the channels, and with post-copy one more for the
    /// pages the destination asks for.
    public var connections: Int { channels + (convergence == .postcopy ? 1 : 0) }
    /// How the source logs the guest's writes (nil: the VM's default; a dirty limit wants the ring,
    /// whose per-vCPU counts it measures).
    public var dirtyLog: DirtyStrategy?
    public init(downtimeLimit: Double = 0.3, maxIterations: Int = 30, convergence: Convergence = .cancel, timeout: Double = 30,
                key: MigrationKey? = nil, maxBandwidth: Double? = nil, channels: Int = 1) {
        self.downtimeLimit = downtimeLimit
        self.maxIterations = maxIterations
        self.convergence = convergence
        self.timeout = timeout
        self.key = key
        self.maxBandwidth = maxBandwidth
        self.channels = channels
    }

    /// Throws unless `limit` (bytes per second over `connections`) lets a record reach the destination
    /// within `timeout`. The source checks it at the start and for each change while it runs; a
    /// controller checks a change before taking it, so a bad value is refused rather than failing the
    /// migration at its next pass.
    public static func checkBandwidth(_ limit: Double?, connections: Int, timeout: Double) throws {
        let least = (Double(Record.maxPayload) * 1.5 * Double(connections) / timeout).rounded(.up)
        guard let limit, limit < least else { return }
        throw MigrationError(.badOption, "max-bandwidth \(formatBytes(UInt64(limit)))/s cannot deliver a record of "
                             + "\(formatBytes(UInt64(Record.maxPayload))) within the \(formatDuration(timeout)) timeout: "
                             + "give at least \(UInt64(least)) bytes/s (\(formatBytes(UInt64(least)))/s)")
    }
}

/// The parameters a running migration takes from its controller at every pass (QMP's
/// migrate-set-parameters).
public final class MigrationTuning: Sendable {
    private let values: Mutex<(limit: Double, bandwidth: Double?)>
    public init(downtimeLimit: Double, maxBandwidth: Double?) {
        values = Mutex((downtimeLimit, maxBandwidth))
    }
    public var downtimeLimit: Double {
        get { values.withLock { $0.limit } }
        set { values.withLock { $0.limit = newValue } }
    }
    /// Bytes per second over all channels; nil: unlimited.
    public var maxBandwidth: Double? {
        get { values.withLock { $0.bandwidth } }
        set { values.withLock { $0.bandwidth = newValue } }
    }
}
