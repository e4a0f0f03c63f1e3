import Foundation
import VirtualMachine

/// Who runs the guest once the stream is in: an exchange on the main channel after END, every
/// record of it sealed when a key is used, that never leaves the guest running on both sides
/// (docs/migration-stream.md, "Switchover").
///
/// ```
/// destination: digest checked, guest loaded paused  -> READY
/// source:      READY seen; from here it never resumes -> GO
/// destination: GO seen; resumes the guest           -> RUNNING
///              (unless GO says the source had it paused: then it stays paused)
/// ```
///
/// The destination resumes only on GO; the source resumes only if it never began to send GO. A
/// side that loses its peer after that point (the source after GO, the destination after READY)
/// cannot know what the other did: it keeps the guest paused and throws `SwitchoverInDoubt`, and
/// the operator resumes whichever copy should run. Either side's ERROR before that point ends the
/// migration with the source running.
enum Switchover {
    /// GO's count when the source's guest was paused: the destination keeps it paused.
    static let keepPaused: UInt32 = 1

    /// The source's half, with its guest paused and STATE and END sent. Returns once the destination
    /// runs the guest; throws (the guest still paused here, the caller resumes it) if the
    /// destination refused or never said READY; throws `SwitchoverInDoubt` after GO. Returns when
    /// READY came.
    @discardableResult
    static func source(_ c: Connection, vm: any VirtualMachine, resumeThere: Bool) throws -> Date {
        let ready = try Record.read(from: c, pageLimit: 0)
        let readyAt = Date()
        if let e = ready.error(from: .destination) { throw e }
        guard ready.type == .ready else { throw MigrationError.badStream("a \(ready.type) record where READY belongs") }
        if c.isCancelled { throw MigrationError.cancelled }
        // The point of no return: whatever happens to GO, this side never resumes on its own.
        let running: Record
        do {
            // A cancel from here on changes nothing: GO goes, and RUNNING is awaited.
            running = try c.withoutStop(timeout: c.timeout) {
                try c.sendRecord(.go, count: resumeThere ? 0 : Self.keepPaused)
                try c.flush()
                return try Record.read(from: c, pageLimit: 0)
            }
        } catch {
            throw SwitchoverInDoubt(side: .source, why: "did not hear that the destination runs it (\(error))", vm: vm)
        }
        guard running.type == .running else {
            let what = running.error(from: .destination).map { "the destination said: \($0.message)" } ?? "a \(running.type) record came"
            throw SwitchoverInDoubt(side: .source, why: "\(what) instead of RUNNING", vm: vm, told: running.error(from: .destination))
        }
        return readyAt
    }

    /// The destination's half, with every record in, the digest checked and the guest loaded paused.
    /// Returns once the guest runs here; throws the source's reason (after discarding the guest) if
    /// it stopped; throws `SwitchoverInDoubt` if the source vanished after READY.
    static func destination(_ c: Connection, vm: any VirtualMachine) throws {
        // A cancel before READY is an ordinary stop: the source resumes its guest.
        if c.isCancelled { throw MigrationError.cancelled }
        let go: Record
        do {
            try c.sendRecord(.ready)
            try c.flush()
            go = try Record.read(from: c, pageLimit: 0)
        } catch {
            throw SwitchoverInDoubt(side: .destination, why: "did not hear GO from the source (\(error))", vm: vm)
        }
        if let e = go.error(from: .source) {
            _ = try? vm.stop()
            throw e
        }
        guard go.type == .go else {
            throw SwitchoverInDoubt(side: .destination, why: "a \(go.type) record came where GO belongs", vm: vm)
        }
        if go.count != Self.keepPaused { try vm.resume() }
        // The source waits for this to report success; if it is lost, the source is in doubt but the
        // guest runs here.
        try? c.withoutStop {
            try c.sendRecord(.running)
            try c.flush()
        }
    }
}
