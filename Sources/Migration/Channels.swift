import Foundation
import GuestMemory
import DirtyLog
import Synchronization

/// The source's channels: each pass's pages are spread over every connection, a 2 MiB block of the
/// bitmap at a time (a channel takes the next block no channel took), and each channel then closes
/// the pass with a SYNC. The first connection is sent on by the calling thread, the others by a thread
/// each; a failure on any shuts all of them down, so no thread stays blocked.
final class ChannelSenders: @unchecked Sendable {   // each sender owns its connection; shared counters are atomic
    let connections: [Connection]
    private let senders: [PageSender]
    private let pagesDone = Atomic<UInt64>(0)
    /// The memory digest, kept as the pages go out.
    let digest: PageDigest
    /// Called on the calling thread with the pages this pass has sent so far, on every channel.
    var tick: ((UInt64) -> Void)?

    /// Passes go over the first `pageChannels` connections (all by default; post-copy keeps the last
    /// for pages the destination asks for).
    init(ram: GuestRAM, connections: [Connection], pageChannels: Int? = nil) {
        self.connections = connections
        let digest = PageDigest(pages: ram.pages)
        self.digest = digest
        senders = connections.prefix(pageChannels ?? connections.count).map { PageSender(ram: ram, connection: $0, digest: digest) }
        for (i, s) in senders.enumerated() {
            s.tick = { [unowned self] n in
                let total = pagesDone.add(n, ordering: .relaxed).newValue
                if i == 0 { tick?(total) }
            }
        }
    }

    var bytesSent: UInt64 { connections.reduce(0) { $0 + $1.bytesSent } }

    /// Opens every further channel and names it (a CHANNEL record: the token and its index), all at
    /// once: the destination takes them in the order they reached it, which need not be ours.
    func open(key: MigrationKey?, token: UInt64) throws {
        try onEachChannel(from: 1, to: connections.count) { [self] i in
            try Handshake.open(connections[i], key: key, further: true)
            try connections[i].sendRecord(.channel, count: UInt32(i), firstPage: token)
            try connections[i].flush()
        }
    }

    /// Sends pass `pass`: the pages `bitmap` names, then a SYNC on every channel; with `delivered`,
    /// returns once the destination has acknowledged it all.
    func sendPass(_ bitmap: [UInt64], pass: UInt32, last: Bool, delivered: Bool = true, report: inout MigrationReport) throws {
        pagesDone.store(0, ordering: .relaxed)
        let blocks = (bitmap.count + 7) / 8
        let nextBlock = Atomic<Int>(0)
        let reports = Mutex<[MigrationReport]>([])
        defer {
            for r in reports.withLock({ $0 }) {
                report.pagesSent += r.pagesSent
                report.zeroPages += r.zeroPages
            }
        }
        try onEachChannel(from: 0, to: senders.count) { [self] i in
            var r = MigrationReport()
            defer { reports.withLock { $0.append(r) } }
            while true {
                let b = nextBlock.add(1, ordering: .relaxed).oldValue
                guard b < blocks else { break }
                // The destination speaks mid-stream only to stop: then its reason ends the pass.
                if i == 0, let e = peerReason(connections[0]) { throw e }
                try senders[i].send(bitmap, words: (b * 8)..<min(bitmap.count, b * 8 + 8), report: &r)
            }
            try connections[i].sendSync(pass: pass, last: last)
            // A pass ends when it has crossed the link, so its time and bandwidth are the link's and
            // not how fast socket buffers filled.
            if delivered { try connections[i].waitUntilDelivered() } else { try connections[i].flush() }
        }
    }

    /// Runs `body(i)` for channels `first..<end`: channel 0 on the calling thread, the others on a
    /// thread each. The first failure shuts every connection (so no channel stays blocked) and is
    /// rethrown once all are done.
    private func onEachChannel(from first: Int, to end: Int, _ body: @escaping @Sendable (Int) throws -> Void) throws {
        let failure = Mutex<Error?>(nil)
        let connections = connections
        @Sendable func run(_ i: Int) {
            do { try body(i) } catch {
                failure.withLock { if $0 == nil { $0 = error } }
                for c in connections { c.interrupt() }
            }
        }
        let group = DispatchGroup()
        for i in 1..<max(1, end) where i >= first {
            group.enter()
            Thread { run(i); group.leave() }.start()
        }
        if first == 0 { run(0) }
        group.wait()
        if let e = failure.withLock({ $0 }) { throw e }
    }
}

/// The destination's meeting point at the end of each pass: a channel that read its SYNC waits here
/// until every channel has read the same pass's SYNC, so a page resent in a later pass on one channel
/// never lands before its earlier copy from another. It also holds the rules that span channels:
/// they agree on which pass is the last, and once the main channel read a DISCARD no channel's pass
/// carries pages (they would land on memory post-copy dropped). A failure on any channel releases
/// everyone.
final class PassBarrier: @unchecked Sendable {   // state under `condition`
    private let parties: Int
    private let timeout: Double
    private let condition = NSCondition()
    private var arrived = 0
    private var generation = 0
    private var pass: (number: UInt32, last: Bool)?
    private var pagesInPass = false
    private var discarded = false
    /// The first failure, which every waiting channel then reports.
    private var failure: Error?

    init(parties: Int, timeout: Double) {
        self.parties = parties
        self.timeout = timeout
    }

    /// The main channel read a DISCARD: from here no pass may carry pages.
    func noteDiscard() {
        condition.lock()
        discarded = true
        condition.unlock()
    }

    /// A channel read the SYNC closing pass `p` (`last`, and whether its part of the pass carried
    /// pages); waits for the others.
    func arrive(pass p: UInt32, last: Bool, carriedPages: Bool) throws {
        condition.lock()
        defer { condition.unlock() }
        func fail(_ e: Error) -> Error {
            if failure == nil { failure = e }
            condition.broadcast()
            return e
        }
        if let failure { throw failure }
        if let pass, pass.number != p { throw fail(MigrationError.badStream("channels disagree on the pass: \(pass.number) and \(p)")) }
        if let pass, pass.last != last { throw fail(MigrationError.badStream("channels disagree whether pass \(p) is the last")) }
        pass = (p, last)
        pagesInPass = pagesInPass || carriedPages
        arrived += 1
        let g = generation
        if arrived == parties {
            if discarded && pagesInPass { throw fail(MigrationError.badStream("pages in pass \(p), after a discard")) }
            arrived = 0
            pass = nil
            pagesInPass = false
            generation += 1
            condition.broadcast()
            return
        }
        let deadline = Date().addingTimeInterval(timeout)
        while generation == g && failure == nil {
            guard condition.wait(until: deadline) else {
                throw fail(MigrationError.timeout("the other channels did not close pass \(p) within \(timeout) s"))
            }
        }
        if let failure { throw failure }
    }

    /// A channel failed outside the barrier: everyone waiting here stops.
    func fail() {
        condition.lock()
        if failure == nil { failure = MigrationError.badStream("another channel failed") }
        condition.broadcast()
        condition.unlock()
    }
}
