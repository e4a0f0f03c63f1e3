import Foundation

/// Opens once and stays open; threads wait for it with a deadline. A job opens its latch when it
/// ends, so `quit` waits for a cancelled job exactly as long as it takes to end, not in polls.
final class Latch: @unchecked Sendable {   // every field under `condition`
    private let condition = NSCondition()
    private var open = false

    func release() {
        condition.lock()
        open = true
        condition.broadcast()
        condition.unlock()
    }

    var isOpen: Bool { condition.lock(); defer { condition.unlock() }; return open }

    /// Whether it opened by `deadline`.
    @discardableResult
    func wait(until deadline: Date) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        while !open {
            // NSCondition traps on a far deadline (see Acceptor): look again at least hourly.
            if !condition.wait(until: min(deadline, Date() + 3600)) && Date() >= deadline { return false }
        }
        return true
    }
}
