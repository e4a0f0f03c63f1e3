import Foundation
import HostSystem
import Glibc
import Synchronization

/// The destination's door while it receives: accepts every connection to the listener on a thread
/// of its own, opens each (Handshake) on a thread of its own, hands the first source's main
/// connection and then that migration's further channels to the receiver, and refuses everything
/// else ("busy", or the handshake's reason), so a second source never disturbs the first.
final class Acceptor: @unchecked Sendable {   // its state under `condition`
    private let listener: Listener
    private let key: MigrationKey?
    private let timeout: Double
    private let condition = NSCondition()
    /// Whether a main connection has been taken (a migration is under way or being opened).
    private var claimed = false
    private var main: (Connection, Handshake.Opening)?
    /// Further channels that opened, by the token they named, each with its index.
    private var further: [UInt64: [(UInt32, Connection)]] = [:]
    /// Set once the migration's token is known: channels naming another are refused.
    private var token: UInt64?
    private var stopped = false
    private var opening = 0
    private static let maxOpening = 32
    private let onRefusal: ((String) -> Void)?
    private let acceptLoopDone = DispatchSemaphore(value: 0)
    /// Ends the accepting thread's wait when the door closes.
    private let stopping: WakeEvent

    init(listener: Listener, key: MigrationKey?, timeout: Double, onRefusal: ((String) -> Void)? = nil) throws {
        self.listener = listener
        self.key = key
        self.timeout = timeout
        self.onRefusal = onRefusal
        stopping = try WakeEvent()
        Thread { [self] in
            defer { acceptLoopDone.signal() }
            while !isStopped {
                let c: Connection
                if let waiting = listener.takeBack() {
                    c = waiting
                } else {
                    do { c = try listener.accept(timeout: 3600, ioTimeout: timeout, wake: stopping) } catch let e as MigrationError
                        where e.code == .timeout || e.code == .cancelled {
                        continue
                    } catch {
                        stopping.sleep(0.1)   // out of descriptors, say: do not spin
                        continue
                    }
                }
                if isStopped {
                    // Accepted as this door closed: the next receive on the listener takes it.
                    listener.putBack(c)
                    break
                }
                condition.lock()
                let room = opening < Self.maxOpening
                if room { opening += 1 }
                condition.unlock()
                guard room else { continue }   // dropped: too many connections opening at once
                Thread { [self] in
                    vet(c)
                    condition.lock(); opening -= 1; condition.unlock()
                }.start()
            }
        }.start()
    }

    private var isStopped: Bool { condition.lock(); defer { condition.unlock() }; return stopped }

    /// Stops accepting (waiting for the accepting thread, so the next receive on the listener never
    /// races this one); channels still opening are refused.
    func stop() {
        condition.lock()
        let already = stopped
        stopped = true
        condition.broadcast()
        condition.unlock()
        stopping.signal()
        if !already { acceptLoopDone.wait() }
    }

    /// Tells the operator what the door refused.
    private func refused(_ why: String) { onRefusal?(why) }

    private static let busy = MigrationError(.busy, "the destination is receiving another migration: try again when it is done")

    /// Opens one connection and files it, or refuses it.
    private func vet(_ c: Connection) {
        do {
            let opening = try Handshake.readOpening(c)
            switch opening {
            case .legacy:
                // Version 2 cannot encrypt or prove a key: a destination with a key never takes it.
                // A version 2 source cannot be told why: it is closed unanswered.
                guard key == nil else {
                    throw MigrationError(.version, "a version 2 source connected; this destination has a key, and version 2 streams "
                                         + "are neither encrypted nor authenticated: update the source")
                }
                guard claim() else { refused("a version 2 source connected while busy"); return }
                deliver(main: c, opening)
            case let .open(open) where !open.further:
                let got = claim()
                do {
                    try Handshake.accept(c, open: open, key: key, refusal: got ? nil : Self.busy)
                } catch {
                    if got { release(failure: error) }
                    throw error
                }
                deliver(main: c, opening)
            case let .open(open):
                try Handshake.accept(c, open: open, key: key)
                let hello = try Record.read(from: c, pageLimit: 0)
                guard hello.type == .channel else { throw MigrationError.badStream("a further channel began with a \(hello.type) record") }
                try deliver(channel: c, token: hello.firstPage, index: hello.count)
            }
        } catch {
            refused("a connection was refused: \(error)")
            if let e = error as? MigrationError, e.code == .busy || e.code == .badStream { c.drain(for: 1) }
        }
    }

    private func claim() -> Bool {
        condition.lock()
        defer { condition.unlock() }
        guard !claimed && !stopped else { return false }
        claimed = true
        return true
    }

    /// A main connection that failed its opening. A source of ours that gave a reason (a key or
    /// version mismatch) ends the wait with it: the operator on both ends sees the same reason.
    /// Anything else (a port scanner, a stall) only frees the door for the next source.
    private func release(failure: Error) {
        condition.lock()
        claimed = false
        if let e = failure as? MigrationError, [.keyMismatch, .keyOnOneSide, .version, .authentication].contains(e.code) {
            mainFailure = e
            condition.broadcast()
        }
        condition.unlock()
    }
    private var mainFailure: MigrationError?

    private func deliver(main c: Connection, _ opening: Handshake.Opening) {
        condition.lock()
        main = (c, opening)
        condition.broadcast()
        condition.unlock()
    }

    private func deliver(channel c: Connection, token t: UInt64, index: UInt32) throws {
        condition.lock()
        if stopped || (token != nil && token != t) {
            condition.unlock()
            let e = MigrationError(.busy, "this channel names a migration the destination is not receiving: it is receiving another")
            try? c.sendError(e)
            throw e
        }
        further[t, default: []].append((index, c))
        condition.broadcast()
        condition.unlock()
    }

    /// Has `cancellation` wake this door's waiters (they look at it before each wait, under the
    /// condition's lock, so a cancel cannot fall between their look and their wait); returns the undo.
    private func wakeOnCancel(_ cancellation: Cancellation?) -> () -> Void {
        guard let cancellation else { return {} }
        let id = cancellation.whenCancelled { [condition] in
            condition.lock()
            condition.broadcast()
            condition.unlock()
        }
        return { cancellation.stopWaking(id) }
    }

    /// The first source's main connection, opened, within `seconds`.
    func waitForMain(seconds: Double, cancellation: Cancellation?) throws -> (Connection, Handshake.Opening) {
        let deadline = Date().addingTimeInterval(seconds)
        let waking = wakeOnCancel(cancellation)
        defer { waking() }
        condition.lock()
        defer { condition.unlock() }
        while main == nil {
            if let mainFailure { throw mainFailure }
            if cancellation?.isCancelled == true { throw MigrationError.cancelled }
            guard Date() < deadline else {
                throw MigrationError.timeout("no source connected to \(listener.address) within \(formatDuration(seconds))")
            }
            _ = condition.wait(until: min(deadline, Date().addingTimeInterval(3600)))   // a `--wait inf` would trap it
        }
        return main!
    }

    /// The further channels 1..<count of the migration named `token`, in index order, each opened
    /// within the timeout. Channels naming any other migration are refused from now on.
    func waitForChannels(token t: UInt64, count: Int, cancellation: Cancellation?) throws -> [Connection] {
        let deadline = Date().addingTimeInterval(timeout)
        condition.lock()
        token = t
        let others = further.filter { $0.key != t }.flatMap { $0.value }
        further = further.filter { $0.key == t }
        condition.unlock()
        for (_, c) in others {
            try? c.sendError(MigrationError(.busy, "this channel names a migration the destination is not receiving: it is receiving another"))
        }
        let waking = wakeOnCancel(cancellation)
        defer { waking() }
        condition.lock()
        defer { condition.unlock() }
        while (further[t]?.count ?? 0) < count - 1 {
            if cancellation?.isCancelled == true { throw MigrationError.cancelled }
            guard Date() < deadline else {
                throw MigrationError.timeout("\(further[t]?.count ?? 0) of the source's \(count - 1) further channels connected within \(formatDuration(timeout))")
            }
            _ = condition.wait(until: min(deadline, Date().addingTimeInterval(3600)))   // a `--wait inf` would trap it
        }
        let got = (further[t] ?? []).sorted { $0.0 < $1.0 }
        guard got.map(\.0) == (1..<UInt32(count)).map({ $0 }) else {
            throw MigrationError.badStream("the further channels are numbered \(got.map(\.0)); expected 1 to \(count - 1) once each")
        }
        return got.map(\.1)
    }
}
