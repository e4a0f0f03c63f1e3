import Foundation
import GuestMemory
import HostSystem
import DirtyLog
import VirtualMachine

/// Post-copy (docs/migration-stream.md, "Post-copy"): the destination runs the guest before all its
/// memory has come. At the switch the source, paused, names the pages the destination holds stale or
/// not at all (DISCARD), sends the state, and hands the guest over (READY, GO, RUNNING) as pre-copy
/// does. From then on the destination drops those pages and has them fault to it (MissingPages);
/// a faulting thread's page is asked for (REQUEST, main channel) and comes on a channel of its own
/// (the last), so it never waits behind the source's push of the rest on the main channel. END
/// follows the last page with the digest; the destination answers COMPLETE once every page is in
/// place and the digest matches.
///
/// Who owns the guest: the destination cannot finish without END, so until the source has sent it
/// a failure on either side leaves the source's copy the only whole one. The destination then stops
/// and discards its guest (a source silent for its timeout counts as a failure), and the source
/// resumes its copy as it was at the switch (what the guest did on the destination since is lost).
/// A failure after END leaves the source in doubt (the destination may have finished): it holds its
/// guest paused.
enum Postcopy {
    /// Pages per placement for `backing`: a hugetlb page faults and is filled whole.
    static func granule(_ backing: Backing) -> UInt64 {
        backing == .hugetlb2M || backing == .hugetlb1G ? backing.hostPageSize.bytes >> PageSize.shift4K : 1
    }

    /// `bitmap` with every granule that holds a set bit set whole.
    static func widened(_ bitmap: [UInt64], granule: UInt64) -> [UInt64] {
        guard granule > 1 else { return bitmap }
        var out = bitmap
        let words = Int(granule / 64)
        for g in stride(from: 0, to: out.count, by: words) {
            let end = min(out.count, g + words)
            if out[g..<end].contains(where: { $0 != 0 }) { for w in g..<end { out[w] = ~0 } }
        }
        return out
    }

    /// The destination, on each DISCARD: the pages it names go from guest memory, and their part of
    /// the digest.
    /// Every one: a page pre-copy never wrote may still be present (a transparent huge page that a
    /// neighbour's write brought in).
    static func drop(_ wanted: [UInt64], from ram: GuestRAM, digest: PageDigest) throws {
        var sums = DigestSums()
        defer { digest.add(sums) }
        var ranges = [[(offset: UInt64, length: UInt64)]](repeating: [], count: ram.slots.count)
        forEachRun(wanted) { first, count in
            for p in first..<(first + count) { digest.set(p, nil, &sums) }
            var p = first
            while p < first + count {
                let s = ram.slot(ofPage: p)
                let n = min(first + count, ram.pages(ofSlot: s).upperBound) - p
                ranges[s].append(((p - ram.firstPage[s]) << PageSize.shift4K, n << PageSize.shift4K))
                p += n
            }
        }
        // All at once: a busy guest's set is many short runs, and this is downtime.
        for (s, r) in ranges.enumerated() where !r.isEmpty {
            do { try ram.slots[s].discard(ranges: r) } catch { throw MigrationError.vm("dropping the stale pages", cause: error) }
        }
    }

    /// Names the pages in `bitmap` to the destination as stale (DISCARD records; only words with a
    /// bit set go). `ask`: the destination answers DROPPED once they are gone.
    static func sendDiscard(_ c: Connection, _ bitmap: [UInt64], ask: Bool) throws {
        let perRecord = Record.maxPayload / 8
        var w = 0, sent = false
        while w < bitmap.count {
            let n = min(perRecord, bitmap.count - w)
            let last = w + n == bitmap.count
            if bitmap[w..<(w + n)].contains(where: { $0 != 0 }) || (last && ask && !sent) {
                try bitmap[w..<(w + n)].withUnsafeBytes { b in
                    try c.sendRecord(.discard, flags: ask && last ? Record.lastPass : 0, count: UInt32(n), firstPage: UInt64(w) << 6, payload: b)
                }
                sent = true
            } else if last && ask {
                try c.sendRecord(.discard, flags: Record.lastPass, count: 0, firstPage: 0)
            }
            w += n
        }
        try c.flush()
    }

    /// The source, before the pause: names the pages pre-copy left stale while the guest still runs
    /// here, so the destination drops the bulk of them outside the pause; returns once it has.
    static func dropEarly(_ c: Connection, _ bitmap: [UInt64]) throws {
        try sendDiscard(c, bitmap, ask: true)
        let answer = try Record.read(from: c, pageLimit: 0)
        if let e = answer.error(from: .destination) { throw e }
        guard answer.type == .dropped else { throw MigrationError.badStream("a \(answer.type) record where DROPPED belongs") }
    }

    /// The source's switch, with the guest paused, every pass closed and the last stale pages named:
    /// the state and POSTCOPY.
    static func announce(_ c: Connection, state: MachineState, timeout: Double) throws {
        try c.sendState(state)
        try c.sendRecord(.postcopy, count: UInt32(min(Double(UInt32.max), (timeout * 1000).rounded(.up))))
    }
}

/// What post-copy did, on the source.
public struct PostcopyReport: Sendable {
    /// The pre-copy passes before the switch.
    public var afterPass = 0
    /// Pages the destination had to fetch.
    public var pages: UInt64 = 0
    /// Pages sent because a guest thread asked for them, and how many requests asked.
    public var requestedPages: UInt64 = 0
    public var requests: UInt64 = 0
    /// From the destination's RUNNING to its COMPLETE.
    public var seconds = 0.0
}

/// The source's half after the handover: pushes the wanted pages in order on the main channel,
/// from after the last page asked for, and serves each REQUEST at once on the post-copy channel.
final class PostcopySource: @unchecked Sendable {   // state under `condition`; the two threads share it
    private let ram: GuestRAM
    private let main: Connection, urgent: Connection
    private let pusher: PageSender, serve: PageSender
    /// What the server sent.
    private var served = MigrationReport()
    private let digest: PageDigest
    private let condition = NSCondition()
    private var unsent: [UInt64]
    private var left: UInt64
    /// The push goes on from here: after the pages last asked for (the guest is likely to touch
    /// their neighbours next).
    private var cursor: UInt64 = 0
    private var serving = 0
    private var completed = false
    private var failure: Error?
    private(set) var report = PostcopyReport()
    /// True once END went: from then on the destination may finish without us.
    private(set) var endSent = false

    init(ram: GuestRAM, main: Connection, urgent: Connection, wanted: [UInt64], digest: PageDigest) {
        self.ram = ram
        self.main = main
        self.urgent = urgent
        self.digest = digest
        pusher = PageSender(ram: ram, connection: main, digest: digest)
        serve = PageSender(ram: ram, connection: urgent, digest: digest)
        unsent = wanted
        left = wanted.pageCount
        report.pages = left
    }

    /// Pushes every page and waits for COMPLETE; `tick` gets the pages sent so far. On a failure
    /// the destination's reason, if the server read one, is the one thrown.
    func run(sent: inout MigrationReport, tick: @escaping (UInt64) -> Void) throws {
        main.duplex = true
        let server = Thread { [self] in serveRequests() }
        server.start()
        func stopServer() {
            // The server ends on COMPLETE, on a failure, or when this side stops its connections.
            main.interrupt()
            urgent.interrupt()
            condition.lock()
            while serving >= 0 { _ = condition.wait(until: Date().addingTimeInterval(0.1)) }
            condition.unlock()
            main.duplex = false
            sent.pagesSent += served.pagesSent
            sent.zeroPages += served.zeroPages
        }
        do {
            try push(sent: &sent, tick: tick)
        } catch {
            stopServer()
            throw condition.withLock { failure } ?? error
        }
        stopServer()
    }

    private func push(sent: inout MigrationReport, tick: @escaping (UInt64) -> Void) throws {
        let start = Date()
        pusher.tick = tick
        var sums = DigestSums()
        defer { digest.add(sums) }
        while let (first, count) = nextRun() {
            try pusher.send(first, count: count, sums: &sums, report: &sent)
        }
        // Every page has gone or is going out on the post-copy channel: wait for those, then END.
        try waitFor("the pages asked for to go out") { serving == 0 }
        digest.add(sums)
        sums = DigestSums()
        endSent = true
        try main.sendEnd(digest: digest.value)
        try main.flush()
        // The destination answers within its own timeout of the last byte it got, which is at most
        // ours: COMPLETE, or an ERROR saying it stopped. Waiting twice as long hears either.
        try waitFor("the destination to place every page and check the digest (COMPLETE)", seconds: 2 * main.timeout + 0.5) { completed }
        report.seconds = Date().timeIntervalSince(start)
    }

    /// Waits (up to the timeout) until `done`, or throws the server's failure.
    private func waitFor(_ what: String, seconds: Double? = nil, _ done: () -> Bool) throws {
        let deadline = Date().addingTimeInterval(seconds ?? main.timeout)
        condition.lock()
        defer { condition.unlock() }
        while !done() {
            if let failure { throw failure }
            guard condition.wait(until: deadline) || done() else { throw MigrationError.timeout(what) }
        }
        if let failure { throw failure }
    }

    /// The next run of unsent pages from the cursor on (wrapping once), up to a record's worth; nil
    /// when none is left. Throws what the server met.
    private func nextRun() -> (UInt64, UInt64)? {
        condition.lock()
        defer { condition.unlock() }
        guard failure == nil, left > 0 else { return nil }
        let pages = UInt64(unsent.count) << 6
        var p = cursor < pages ? cursor : 0
        var scanned: UInt64 = 0
        while scanned <= pages {
            let w = Int(p >> 6)
            let word = unsent[w] & (~0 << (p & 63))
            if word != 0 {
                let first = UInt64(w) << 6 + UInt64(word.trailingZeroBitCount)
                let run = unsent.takeRun(from: first, upTo: UInt64(Record.maxPagesPerRecord))
                left -= run
                cursor = first + run
                return (first, run)
            }
            scanned += 64 - (p & 63)
            p = (UInt64(w) + 1) << 6
            if p >= pages { p = 0 }
        }
        return nil
    }

    /// The server thread: reads the destination's REQUESTs (and its COMPLETE or ERROR) from the
    /// main channel and sends each page asked for, not sent yet, on the post-copy channel.
    private func serveRequests() {
        var sums = DigestSums()
        var sent = MigrationReport()
        defer { condition.withLock { served = sent } }
        do {
            while true {
                try main.waitUntilReadable()   // requests come when the guest faults, however rarely
                let r = try Record.read(from: main, pageLimit: ram.pages)
                switch r.type {
                case .request:
                    var runs: [(UInt64, UInt64)] = []
                    condition.lock()
                    report.requests += 1
                    var p = r.firstPage
                    let end = r.firstPage + UInt64(r.count)
                    while p < end {
                        let n = unsent.takeRun(from: p, upTo: end - p)
                        if n > 0 { runs.append((p, n)); left -= n }
                        p += max(n, 1)
                    }
                    if !runs.isEmpty { serving += 1; cursor = end }
                    condition.unlock()
                    guard !runs.isEmpty else { continue }
                    for (first, count) in runs { try serve.send(first, count: count, sums: &sums, report: &sent) }
                    try urgent.flush()
                    digest.add(sums)
                    sums = DigestSums()
                    condition.lock()
                    report.requestedPages += runs.reduce(0) { $0 + $1.1 }
                    serving -= 1
                    condition.broadcast()
                    condition.unlock()
                case .complete:
                    condition.lock()
                    completed = true
                    serving = -1
                    condition.broadcast()
                    condition.unlock()
                    return
                case .error:
                    throw r.error(from: .destination)!
                default:
                    throw MigrationError.badStream("a \(r.type) record from the destination during post-copy")
                }
            }
        } catch {
            digest.add(sums)
            condition.lock()
            if failure == nil && !completed { failure = error }
            serving = -1
            condition.broadcast()
            condition.unlock()
            urgent.interrupt()
        }
    }
}

/// The destination's half: from the switch (the guest loaded, paused) until every page is in
/// place. Drops the stale pages, has absent ones fault here, asks for each faulting page, and places
/// what comes on either channel exactly once.
final class PostcopyDestination: @unchecked Sendable {   // state under `condition`; three threads share it
    private let vm: any VirtualMachine
    private let ram: GuestRAM
    private let faults: MissingPages
    private let main: Connection, urgent: Connection
    private let digest: PageDigest
    /// Pages the source sends (fixed at the switch) and those not yet placed.
    private let wanted: [UInt64]
    private var absent: [UInt64]
    private var left: UInt64
    private var requested: [UInt64]
    /// When each outstanding request went (by its first page), for the latency.
    private var asked: [UInt64: UInt64] = [:]
    /// hugetlb: granules being filled, by first page.
    private var filling: [UInt64: Staging] = [:]
    private let granule: UInt64
    private let condition = NSCondition()
    private let sendLock = NSLock()
    private var finished = false
    private var failure: Error?
    private(set) var stats = (faults: 0, requests: 0, latencyNanos: UInt64(0), maxLatencyNanos: UInt64(0))

    /// Registers guest RAM for faults (the DISCARD records dropped the wanted pages as they came).
    init(vm: any VirtualMachine, wanted: [UInt64], digest: PageDigest, main: Connection, urgent: Connection) throws {
        self.vm = vm
        ram = vm.ram
        self.main = main
        self.urgent = urgent
        self.digest = digest
        granule = Postcopy.granule(ram.backing)
        self.wanted = wanted
        absent = wanted
        requested = [UInt64](repeating: 0, count: wanted.count)
        left = wanted.pageCount
        do { faults = try MissingPages(ram: ram) } catch { throw MigrationError.vm("post-copy needs userfaultfd", cause: error) }
    }

    /// Serves faults and places pages until END and the last page; checks the digest, stops
    /// faulting and answers COMPLETE. On any failure the guest is stopped here (it cannot go on
    /// without the source) and the error thrown.
    func run(progress: (String) -> Void) throws {
        main.duplex = true
        urgent.duplex = true
        // A failing thread records why first (the main reader's failure is then its consequence).
        let faulter = ChannelReader(onFailure: {}) { [self] in
            do { try serveFaults() } catch { fail(error); throw error }
        }
        let reader = ChannelReader(onFailure: {}) { [self] in
            do { _ = try readPages(from: urgent, main: false) } catch { fail(error); throw error }
        }
        defer {
            condition.lock(); finished = true; condition.unlock()
            urgent.interrupt()
            faulter.join()
            reader.join()
            main.duplex = false
        }
        do {
            let end = try readPages(from: main, main: true)!
            condition.lock()
            let deadline = Date().addingTimeInterval(main.timeout)
            while left > 0 && failure == nil {
                guard condition.wait(until: deadline) || left == 0 else {
                    condition.unlock()
                    throw MigrationError.timeout("\(left) pages to come after END")
                }
            }
            let failed = failure
            finished = true
            condition.unlock()
            if let failed { throw failed }
            guard digest.value == end else { throw MigrationError.digestMismatch }
            // The fault thread first: a zero fill it is making must not meet an unregistered range.
            faulter.join()
            faults.release()
            try sendLock.withLock {
                try main.sendRecord(.complete)
                try main.flush()
            }
            let s = stats
            progress(String(format: "post-copy: every page in place, digest matches; %d faults, %d requests, latency %.0f µs mean, %.0f µs max",
                            s.faults, s.requests, s.requests > 0 ? Double(s.latencyNanos) / Double(s.requests) / 1e3 : 0,
                            Double(s.maxLatencyNanos) / 1e3))
        } catch {
            let reason = failure ?? error
            // Nobody will place the missing pages now: wake every sleeper (onto zeros) so the guest
            // can stop, and stop it.
            condition.lock(); finished = true; condition.unlock()
            faults.release()
            _ = try? vm.stop()
            throw reason
        }
    }

    private func fail(_ e: Error) {
        condition.lock()
        let first = failure == nil && !finished
        if first { failure = e }
        condition.broadcast()
        condition.unlock()
        if first { main.interrupt() }
    }

    private var isFinished: Bool { condition.lock(); defer { condition.unlock() }; return finished }

    /// The fault thread: each fault on a page the source sends is asked for (once); one on a page
    /// it does not send reads as zeros (it held zeros at the switch and was never written here).
    private func serveFaults() throws {
        while !isFinished {
            for p in try faults.waitForFaults(timeout: 0.05) {
                let first = p / granule * granule
                if !wanted.isSet(p) {
                    try faults.placeZeros(page: first, count: granule)
                    continue
                }
                condition.lock()
                stats.faults += 1
                // Ask unless asked already or in place: for a huge page, while any part is still to
                // come (the push may have sent part of it, the rest far behind).
                let ask = !requested.isSet(first) && (absent.isSet(p) || (granule > 1 && filling[first] != nil))
                if ask {
                    requested.set(first)
                    asked[first] = monotonicNanos()
                    stats.requests += 1
                }
                condition.unlock()
                guard ask else { continue }
                try sendLock.withLock {
                    try main.sendRecord(.request, count: UInt32(granule), firstPage: first)
                    try main.flush()
                }
            }
        }
    }

    /// Reads PAGES from `c` and places them; on the main channel until END, whose digest it returns.
    @discardableResult
    private func readPages(from c: Connection, main: Bool) throws -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: Record.maxPayload)
        while true {
            let r: Record
            do {
                // The post-copy channel carries pages only when asked: it may be silent for long.
                if !main { try c.waitUntilReadable() }
                r = try Record.read(from: c, pageLimit: ram.pages, into: &buffer)
            } catch {
                if !main && isFinished { return nil }   // stopped on purpose: every page came
                throw error
            }
            switch r.type {
            case .pages:
                let (_, slotEnd) = ram.location(page: r.firstPage)
                guard r.firstPage + UInt64(r.count) <= slotEnd else {
                    throw MigrationError.badStream("page run \(r.firstPage)+\(r.count) crosses the end of a memory slot")
                }
                try buffer.withUnsafeBytes { b in try place(r.firstPage, count: UInt64(r.count), data: r.zero ? nil : b.baseAddress!) }
            case .end where main:
                return r.payload
            case .error:
                throw r.error(from: .source)!
            default:
                throw MigrationError.badStream("a \(r.type) record during post-copy")
            }
        }
    }

    /// Places pages `first..<first+count` (data: their bytes, nil for zeros); a page not wanted, or
    /// placed already, is refused.
    private func place(_ first: UInt64, count: UInt64, data: UnsafeRawPointer?) throws {
        if granule > 1 { return try fill(first, count: count, data: data) }
        var p = first
        while p < first + count {
            // Claim the run of absent pages from p: this thread alone places them.
            let n = condition.withLock { absent.takeRun(from: p, upTo: first + count - p) }
            guard n > 0 else { throw MigrationError.badStream("page \(p) sent twice, or not one the destination fetches") }
            let bytes = data.map { $0 + Int((p - first) << PageSize.shift4K) }
            // Absent until now, by the drop at the switch: a page found present would leave stale
            // bytes in the guest.
            let done: Bool
            do {
                done = try bytes.map { try faults.place(page: p, count: n, from: $0) } ?? faults.placeZeros(page: p, count: n)
            } catch { throw MigrationError.vm("placing pages \(p)+\(n)", cause: error) }
            guard done else { throw MigrationError.vm("pages \(p)+\(n) were present where post-copy dropped them") }
            var sums = DigestSums()
            for i in 0..<n { digest.set(p + i, bytes.map { $0 + Int(i << PageSize.shift4K) }, &sums) }
            placed(p, n, sums)
            p += n
        }
    }

    /// hugetlb: gathers pages into their granule's buffer and places the granule once it is full.
    private func fill(_ first: UInt64, count: UInt64, data: UnsafeRawPointer?) throws {
        let bytes = Int(granule << PageSize.shift4K)
        for p in first..<(first + count) {
            let g = p / granule * granule
            condition.lock()
            guard absent.takeRun(from: p, upTo: 1) == 1 else {
                condition.unlock()
                throw MigrationError.badStream("page \(p) sent twice, or not one the destination fetches")
            }
            let staging: Staging
            if let s = filling[g] {
                staging = s
            } else {
                do { staging = try Staging(bytes: bytes) } catch {
                    condition.unlock()
                    throw MigrationError.vm("no memory for a huge page's buffer", cause: error)
                }
                filling[g] = staging
            }
            let buffer = staging.buffer.base
            if let data { (buffer + Int((p - g) << PageSize.shift4K)).copyMemory(from: data + Int((p - first) << PageSize.shift4K), byteCount: 4096) }
            staging.pages += 1
            let full = staging.pages == granule
            if full { filling[g] = nil }
            condition.unlock()
            guard full else { continue }
            // Out of `filling`, the buffer is this thread's alone; it is unmapped once placed (kept
            // alive to here explicitly: only a reference, not the raw pointer, holds it).
            try withExtendedLifetime(staging) {
                let done: Bool
                do { done = try faults.place(page: g, count: granule, from: buffer) } catch { throw MigrationError.vm("placing huge page \(g)", cause: error) }
                guard done else { throw MigrationError.vm("huge page \(g) was present where post-copy dropped it") }
                var sums = DigestSums()
                for i in 0..<granule { digest.set(g + i, buffer + Int(i << PageSize.shift4K), &sums) }
                placed(g, granule, sums)
            }
        }
    }

    /// Counts placed pages (their part of the digest in first: END's check may wait on another
    /// channel's last page), and the latency of the request that asked for them.
    private func placed(_ first: UInt64, _ n: UInt64, _ sums: DigestSums) {
        digest.add(sums)
        condition.lock()
        for p in stride(from: first / granule * granule, to: first + n, by: Int(granule)) {
            if let t = asked.removeValue(forKey: p) {
                let ns = monotonicNanos() - t
                stats.latencyNanos += ns
                stats.maxLatencyNanos = max(stats.maxLatencyNanos, ns)
            }
        }
        left -= n
        if left == 0 { condition.broadcast() }
        condition.unlock()
    }
}

/// The source's switch to post-copy, where pre-copy would not converge (migrate's last step then),
/// with the guest paused and `stale` harvested: closes the passes, names the pages `named` left
/// out, hands the guest over and serves its pages until the destination has them all. A failure
/// after GO and before END resumes the guest here (migrate's rollback) once the destination has
/// surely stopped its own: at once if it said so, else after the timeout it stops a silent
/// source's guest by.
func switchToPostcopy(_ vm: any VirtualMachine, main: Connection, urgent: Connection, channels: ChannelSenders, stale: [UInt64],
                      named: [UInt64], pause: PauseClock, wasRunning: Bool, options: MigrationOptions, report: MigrationReport,
                      out: ProgressReporter, start: Date) throws -> MigrationReport {
    var report = report
    var pause = pause
    func tell(_ event: String) { out.report(bytes: channels.bytesSent, event: event) }
    vm.setThrottle(percent: 0)
    // The guest stays paused here until it comes back or goes: nothing more to log.
    try? vm.disableDirtyLogging()
    let wanted = Postcopy.widened(stale, granule: Postcopy.granule(vm.ram.backing))
    let pages = wanted.pageCount
    out.update { $0.phase = .postcopy; $0.pagesPlanned = pages; $0.pagesDone = 0 }
    // Every page channel closes the last pass, which carries nothing: the rest goes on demand.
    // Not waited for: a peer that spoke (DROPPED) may hold its acknowledgement back for 40 ms
    // (delayed ACK), and what follows goes on the same connections anyway.
    try channels.sendPass([UInt64](repeating: 0, count: wanted.count), pass: UInt32(report.iterations + 1), last: true, delivered: false,
                          report: &report)
    pause.part("last pass")
    // What the destination has not dropped yet: the pages dirtied since the last harvest.
    var rest = wanted
    for i in rest.indices { rest[i] &= ~named[i] }
    try Postcopy.sendDiscard(main, rest, ask: false)
    try Postcopy.announce(main, state: try vm.saveState(), timeout: options.timeout)
    pause.part("state")
    let pc = PostcopySource(ram: vm.ram, main: main, urgent: urgent, wanted: wanted, digest: channels.digest)
    var goSent = false
    do {
        let ready: Date
        do { ready = try Switchover.source(main, vm: vm, resumeThere: wasRunning) } catch let e as SwitchoverInDoubt {
            goSent = true
            throw e.told ?? MigrationError.connection(e.why)
        }
        goSent = true
        pause.part("destination", at: ready)
        pause.part("handover")
        (report.downtimeSeconds, report.downtimeParts) = (pause.seconds, pause.parts)
        tell(String(format: "post-copy after pass %d: the destination runs the guest; %@ follow", report.iterations,
                    formatBytes(pages << 12)))
        var done: UInt64 = 0
        try pc.run(sent: &report) { n in
            done += n
            out.update { $0.pagesDone = done }
            out.report(bytes: channels.bytesSent, force: false)
        }
    } catch {
        // Before GO: pre-copy's rollback.
        guard goSent else { throw error }
        // After END the destination may have finished, unless it said it stopped (it says so only
        // once its guest is stopped for good).
        let told = (error as? MigrationError).flatMap { $0.toldBy == nil ? nil : $0 } ?? stoppedReason(main)
        if pc.endSent && told == nil {
            throw SwitchoverInDoubt(side: .source, why: "sent every page and END, then \(error) instead of COMPLETE", vm: vm)
        }
        try fallBack(error, told: told, options: options, main: main, urgent: urgent, out: out)
    }
    _ = try? vm.stop()
    var post = pc.report
    post.afterPass = report.iterations
    report.postcopy = post
    report.bytesSent = channels.bytesSent
    report.totalSeconds = Date().timeIntervalSince(start)
    out.update { $0.phase = .done }
    tell("post-copy complete: the destination has every page")
    return report
}

/// A post-copy that broke after GO and before END: once the destination has surely stopped its
/// guest (it said so, or it stops one whose source is silent for the timeout), throws for migrate to
/// resume the guest here.
private func fallBack(_ error: Error, told: MigrationError?, options: MigrationOptions, main: Connection, urgent: Connection,
                      out: ProgressReporter) throws -> Never {
    if let told {
        throw MigrationError(told.code, "post-copy failed after the switch: \(told.message); the destination discarded its guest, "
                             + "which resumes here as it was at the switch", toldBy: told.toldBy)
    }
    // Nothing more reaches the destination from here: its timeout runs from what it already has.
    out.report(event: "post-copy broke (\(error)); waiting \(formatDuration(options.timeout)) for the destination to stop its guest")
    main.fence(within: options.timeout)
    urgent.fence(within: options.timeout)
    Thread.sleep(forTimeInterval: options.timeout + 0.5)
    throw MigrationError(.connection, "post-copy broke after the switch (\(error)); the destination, silent, has stopped its guest "
                         + "by now, and the guest resumes here as it was at the switch (what it ran there since is lost)")
}

/// The destination's ERROR among what it sent last (requests may come before it).
private func stoppedReason(_ c: Connection) -> MigrationError? {
    for _ in 0..<100_000 {
        guard c.peerHasSpoken, let r = try? c.withoutStop(timeout: 1, { try Record.read(from: c, pageLimit: UInt64(1) << 48) }) else { return nil }
        if let e = r.error(from: .destination) { return e }
        guard r.type == .request else { return nil }
    }
    return nil
}

/// A huge page's 4 KiB pages gathered as they arrive (hugetlb post-copy), until the whole granule
/// can be placed at once. Anonymous memory: zeros until written, so a zero run needs no copy.
private final class Staging {
    let buffer: Mapping
    var pages: UInt64 = 0

    init(bytes: Int) throws(SystemCallError) {
        buffer = try Mapping(size: bytes, flags: MAP_PRIVATE | MAP_ANONYMOUS, what: "a huge page's staging buffer (\(formatBytes(UInt64(bytes))))")
    }
}
