import Foundation
import Synchronization

/// Opens once and stays open; threads wait for it with a deadline. A job opens its latch when it
/// ends, so `quit` waits for a cancelled job exactly as long as it takes to end, not in polls.
final class Latch: Sendable {
    private let condition = NSCondition()
    /// Set under `condition`'s lock, so a waiter that saw it unset is already waiting when it is.
    private let open = Atomic(false)

    func release() {
        condition.lock()
        open.store(true, ordering: .sequentiallyConsistent)
        condition.broadcast()
        condition.unlock()
    }

    var isOpen: Bool { open.load(ordering: .sequentiallyConsistent) }

    /// Whether it opened by `deadline`.
    @discardableResult
    func wait(until deadline: Date) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        while !isOpen {
            // NSCondition traps on a far deadline (a `--wait inf`): look again at least hourly.
            if !condition.wait(until: min(deadline, Date() + 3600)) && Date() >= deadline { return false }
        }
        return true
    }
}
