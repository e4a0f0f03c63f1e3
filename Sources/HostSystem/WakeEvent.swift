import CVMMSys
import Glibc

/// An eventfd a thread polls beside what it waits for, so another thread can end the wait at once
/// (a stop, a cancellation) instead of the waiter waking every so often to look. It stays readable
/// from `signal` until the waiter's `clear`, so a signal sent before the poll still ends it.
public final class WakeEvent: Sendable {
    private let descriptor: FileDescriptor

    public init() throws(SystemCallError) {
        descriptor = FileDescriptor(owning: try system("eventfd") { cvmm_eventfd() })
    }

    /// The descriptor to poll for POLLIN.
    package var raw: Int32 { descriptor.raw }

    /// Ends the current or next poll on it. Any thread, any number of times.
    public func signal() {
        var one: UInt64 = 1
        _ = write(descriptor.raw, &one, 8)
    }

    /// Sleeps `seconds`, or less if signalled (a back-off that a stop still ends at once).
    public func sleep(_ seconds: Double) {
        var p = pollfd(fd: descriptor.raw, events: Int16(POLLIN), revents: 0)
        _ = poll(&p, 1, Int32(min(max(0, seconds), 86_400) * 1000))
    }

    /// Makes it unreadable again (after a poll it ended).
    public func clear() {
        var count: UInt64 = 0
        _ = read(descriptor.raw, &count, 8)
    }
}
