import Foundation
import VirtualMachine

/// Why a migration or snapshot stopped, on either side. A side that stops tells its peer in an ERROR
/// record carrying `code` and `message`, so both print the same reason; `toldBy` then names the side
/// that found it.
public struct MigrationError: Error, Equatable, CustomStringConvertible {
    /// The reason's class, on the wire as a 32-bit code (docs/migration-stream.md).
    public enum Code: UInt32, Sendable, CustomStringConvertible {
        case cancelled = 1
        /// Both ends have a key, but not the same one.
        case keyMismatch = 2
        /// One end has a key and the other none.
        case keyOnOneSide = 3
        case digestMismatch = 4
        /// The destination cannot hold the guest.
        case outOfMemory = 5
        /// The peer speaks a stream version outside this side's range.
        case version = 6
        case badStream = 7
        /// The destination is receiving another migration.
        case busy = 8
        case timeout = 9
        case connection = 10
        /// A record or the handshake failed authentication: the stream was altered.
        case authentication = 11
        /// The VM refused an operation (building, loading or starting the guest).
        case vm = 12
        /// A key file is unusable.
        case badKey = 13
        /// A migration option that cannot work (a bandwidth too low for the timeout).
        case badOption = 14
        /// Pre-copy reached its pass limit above the downtime limit, and the policy was to cancel.
        case notConverged = 15
        case unknown = 0

        public var description: String {
            switch self {
            case .cancelled: return "cancelled"
            case .keyMismatch: return "key mismatch"
            case .keyOnOneSide: return "key on one side only"
            case .digestMismatch: return "digest mismatch"
            case .outOfMemory: return "out of memory"
            case .version: return "version"
            case .badStream: return "bad stream"
            case .busy: return "busy"
            case .timeout: return "timeout"
            case .connection: return "connection"
            case .authentication: return "authentication"
            case .vm: return "vm"
            case .badKey: return "bad key"
            case .badOption: return "bad option"
            case .notConverged: return "not converged"
            case .unknown: return "unknown"
            }
        }
    }

    /// Which end of a migration.
    public enum Side: String, Sendable { case source, destination }

    public var code: Code
    /// What happened and, where there is something to do, what to do.
    public var message: String
    /// Set when the peer stopped and said why; nil when this side found it.
    public var toldBy: Side?
    /// The error underneath, when another layer's failure is why (a system call, the VM, KVM).
    public var cause: (any Error)?

    public init(_ code: Code, _ message: String, toldBy: Side? = nil, cause: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.toldBy = toldBy
        self.cause = cause
    }

    /// The message with its cause: what the CLI prints and what an ERROR record carries.
    public var reason: String { cause.map { "\(message): \($0)" } ?? message }

    public var description: String { toldBy.map { "\(reason) (said the \($0))" } ?? reason }

    /// Equal in what the peer can see: code, reason and who said it.
    public static func == (a: MigrationError, b: MigrationError) -> Bool {
        a.code == b.code && a.reason == b.reason && a.toldBy == b.toldBy
    }

    public static func connection(_ why: String, cause: (any Error)? = nil) -> MigrationError { .init(.connection, "connection: \(why)", cause: cause) }
    public static func timeout(_ what: String) -> MigrationError { .init(.timeout, "timed out: \(what)") }
    public static func badStream(_ why: String, cause: (any Error)? = nil) -> MigrationError {
        .init(.badStream, "bad migration stream or snapshot: \(why)", cause: cause)
    }
    public static func vm(_ why: String, cause: (any Error)? = nil) -> MigrationError { .init(.vm, "VM: \(why)", cause: cause) }
    public static func authentication(_ why: String) -> MigrationError { .init(.authentication, "authentication failed: \(why)") }
    public static let cancelled = MigrationError(.cancelled, "cancelled")
    public static let digestMismatch = MigrationError(.digestMismatch,
        "the destination's memory digest does not match the source's: the guest was not resumed there")

    /// `error` as a reason to send the peer: a migration error as it is, anything else by its text.
    public init(describing error: Error) {
        if let e = error as? MigrationError { self = e; return }
        if let e = error as? VMError { self.init(.vm, "VM: \(e.message)", cause: e.cause); return }
        self.init(.unknown, "\(error)")
    }
}

/// The switchover broke where this side can no longer decide alone: it handed the guest over (the
/// source sent GO) or was ready to take it (the destination said READY), and then lost the peer.
/// The guest is paused here and was not resumed; it may run on the other side, or on neither. The
/// operator decides: if the other side does not run it, resume it here (`resume()` on the VM, the
/// control socket's `cont`); otherwise discard it.
public struct SwitchoverInDoubt: Error, CustomStringConvertible, Sendable {
    public let side: MigrationError.Side
    /// What broke.
    public let why: String
    /// The guest, paused: on the source the VM that was migrating; on the destination the received one.
    public let vm: any VirtualMachine
    /// The peer's ERROR, if one came where its answer belonged.
    var told: MigrationError? = nil

    public var description: String {
        switch side {
        case .source:
            return "switchover in doubt: the source handed the guest over (sent GO) and then \(why). The guest is paused here, "
                + "not resumed: if the destination does not run it, resume it here; if it does, discard this copy"
        case .destination:
            return "switchover in doubt: this destination was ready to take the guest (sent READY) and then \(why). The guest "
                + "is loaded here and paused, not resumed: if the source does not run it, resume it here; if it does, discard this copy"
        }
    }
}
