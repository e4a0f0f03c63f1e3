import CVMMSys
import Foundation
import Glibc
import GuestMemory
import HostSystem
import Synchronization

/// A wire with latency and loss between two TUN devices, one in each namespace of a shaped link,
/// for a kernel without tc's netem: every IP packet one end sends is read here and written to the
/// other end half the round trip later, or dropped with the loss probability. TCP runs end to end
/// over it (this is a router, not a relay), so both ends see the real round trip and retransmit
/// what is lost.
final class DelayLine: Sendable {
    private let a: FileDescriptor, b: FileDescriptor
    private let wire: Wire
    private let done = DispatchGroup()

    /// What the two threads share. Not the line itself: a thread that held the line would keep its
    /// devices open past the owner's release, until the thread let go of it too.
    private final class Wire: Sendable {
        let running = Atomic<Bool>(true)
        let oneWay: UInt64
        let loss: Double
        init(oneWay: UInt64, loss: Double) { (self.oneWay, self.loss) = (oneWay, loss) }
    }

    /// Carries packets between the TUN devices `a` and `b` (closed when the line goes).
    init(_ a: consuming FileDescriptor, _ b: consuming FileDescriptor, roundTrip: Double, loss: Double) {
        let (ra, rb) = (a.raw, b.raw)
        self.a = a
        self.b = b
        let wire = Wire(oneWay: UInt64(roundTrip / 2 * 1e9), loss: loss)
        self.wire = wire
        for (from, to) in [(ra, rb), (rb, ra)] {
            done.enter()
            let t = Thread { [done] in Self.carry(wire, from: from, to: to); done.leave() }
            t.name = "delay-line"
            t.start()
        }
    }

    func stop() {
        guard wire.running.exchange(false, ordering: .acquiringAndReleasing) else { return }
        done.wait()
    }

    // The threads use the descriptors until they end: stopped first, closed after.
    deinit { stop() }

    private static func carry(_ wire: Wire, from: Int32, to: Int32) {
        var queue: [(due: UInt64, packet: [UInt8])] = []
        var head = 0
        var buffer = [UInt8](repeating: 0, count: 65_536)
        var rng = SystemRandomNumberGenerator()
        while wire.running.load(ordering: .acquiring) {
            let now = monotonicNanos()
            // Rounded up: a packet due in under a millisecond waits that millisecond, not a spin.
            let wait = head < queue.count ? Int32(min(100, (queue[head].due &- min(now, queue[head].due) + 999_999) / 1_000_000)) : 100
            var p = pollfd(fd: from, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, wait) > 0 {
                // The device went away (its namespace deleted): this direction ends.
                guard p.revents & Int16(POLLERR | POLLHUP | POLLNVAL) == 0 else { return }
                while true {
                    let n = buffer.withUnsafeMutableBytes { read(from, $0.baseAddress, $0.count) }
                    if n < 0 && errno != EAGAIN && errno != EINTR { return }
                    guard n > 0 else { break }
                    if wire.loss > 0 && Double.random(in: 0..<1, using: &rng) < wire.loss { continue }
                    queue.append((monotonicNanos() + wire.oneWay, Array(buffer[0..<n])))
                }
            }
            let due = monotonicNanos()
            while head < queue.count && queue[head].due <= due {
                _ = queue[head].packet.withUnsafeBytes { write(to, $0.baseAddress, $0.count) }
                head += 1
            }
            if head > 4096 && head * 2 > queue.count {
                queue.removeFirst(head)
                head = 0
            }
        }
    }
}
