import Foundation
import GuestMemory
import DirtyLog
import Synchronization
import VirtualMachine

/// How the destination receives.
public struct ReceiveOptions: Sendable {
    /// The pre-shared key; nil takes only a source without one.
    public var key: MigrationKey?
    /// Seconds each receive, each record and the wait for the source's GO may take.
    public var timeout: Double
    /// Seconds to wait for a source to connect.
    public var acceptTimeout: Double
    /// Guests with more memory than this are refused as out of memory (nil: any).
    public var maxMemory: UInt64?

    public init(key: MigrationKey? = nil, timeout: Double = 30, acceptTimeout: Double = 60, maxMemory: UInt64? = nil) {
        self.key = key
        self.timeout = timeout
        self.acceptTimeout = acceptTimeout
        self.maxMemory = maxMemory
    }
}

/// The destination side: wait on `listener` for a source, read its stream (over its further channels
/// too), build the VM it describes, and run the guest once the source hands it over (Switchover);
/// any other source that connects meanwhile is told "busy". On a failure the source is told why, the
/// partial VM is discarded, and the error rethrown; a switchover that breaks after READY throws
/// `SwitchoverInDoubt` with the guest loaded and paused.
public func receive(on listener: Listener, options: ReceiveOptions = ReceiveOptions(), cancellation: Cancellation? = nil,
                    progress: ((MigrationProgress) -> Void)? = nil) throws -> any VirtualMachine {
    let out = ProgressReporter(progress)
    // The door stays open until this returns, answering "busy" to any other source.
    let acceptor = try Acceptor(listener: listener, key: options.key, timeout: options.timeout, onRefusal: { why in out.report(event: why) })
    defer { acceptor.stop() }
    let (connection, opening) = try acceptor.waitForMain(seconds: options.acceptTimeout, cancellation: cancellation)
    return try receive(connection, opening, options: options, cancellation: cancellation, out: out) { token, count in
        try acceptor.waitForChannels(token: token, count: count, cancellation: cancellation)
    }
}

/// The destination side over one connection the caller already holds (a socket pair, a socket
/// handed over by a management process: QEMU's `fd:` migration), as `receive(on:)` does otherwise.
/// One connection carries one channel: a source that asks for more (or for post-copy) is refused.
public func receive(over connection: Connection, options: ReceiveOptions = ReceiveOptions(), cancellation: Cancellation? = nil,
                    progress: ((MigrationProgress) -> Void)? = nil) throws -> any VirtualMachine {
    connection.timeout = options.timeout
    cancellation?.watch(connection)   // a cancel during the handshake stops it too
    let opening = try Handshake.readOpening(connection)
    switch opening {
    case .legacy:
        guard options.key == nil else {
            throw MigrationError(.version, "a version 2 source connected; this destination has a key, and version 2 streams are neither encrypted nor authenticated")
        }
    case let .open(open):
        guard !open.further else { throw MigrationError.badStream("a further channel where the stream's first connection belongs") }
        try Handshake.accept(connection, open: open, key: options.key)
    }
    return try receive(connection, opening, options: options, cancellation: cancellation, out: ProgressReporter(progress)) { _, count in
        guard count == 1 else {
            throw MigrationError(.badOption, "the source asks for \(count) connections; a migration over one connection has one: migrate with one channel and without post-copy")
        }
        return []
    }
}

/// The stream after its opening: `further` brings the source's other channels.
private func receive(_ connection: Connection, _ opening: Handshake.Opening, options: ReceiveOptions, cancellation: Cancellation?,
                     out: ProgressReporter, further: (UInt64, Int) throws -> [Connection]) throws -> any VirtualMachine {
    cancellation?.watch(connection)
    let start = monotonicNanos()
    var channels: [Connection] = []
    func tell(_ phase: MigrationProgress.Phase, _ event: String? = nil, force: Bool = true) {
        out.update { $0.phase = phase }
        out.report(bytes: channels.reduce(connection.bytesReceived) { $0 + $1.bytesReceived }, event: event, force: force, rateSince: start)
    }
    var readers: [ChannelReader] = []
    defer { for r in readers { r.join() } }
    var loaded: (any VirtualMachine)?
    // Post-copy's channel for the pages the destination asks for: the last; it carries no pass.
    var urgent: Connection?
    do {
        let guest: GuestDescription, count: Int
        switch opening {
        case let .legacy(prefix):
            let header = try Version2Header.read(from: connection, prefix: prefix)
            (guest, count) = (header.guest, 1)
            tell(.setup, "a version 2 source: its guest is resumed as version 2 did, without the switchover exchange")
        case let .open(open):
            let first = try Record.read(from: connection, pageLimit: 0)
            if let e = first.error(from: .source) { throw e }
            guard first.type == .guest else { throw MigrationError.badStream("the stream began with a \(first.type) record") }
            guest = try GuestDescription.decode(first.payload, version: open.version, context: "")
            count = Int(first.count)
            guard (1...Connection.maxChannels).contains(count) else { throw MigrationError.badStream("\(count) channels") }
            channels = try further(first.firstPage, count)
            for c in channels { cancellation?.watch(c) }
            if first.postcopyChannel {
                guard count >= 2, open.version >= 6 else { throw MigrationError.badStream("a post-copy channel among \(count) channel(s), version \(open.version)") }
                // Refused here, before any memory moves, rather than at the switch.
                do { try MissingPages.check() } catch {
                    throw MigrationError(.badOption, "post-copy needs userfaultfd on the destination: \(error); migrate without convergence=postcopy")
                }
                urgent = channels.last
            }
        }
        let vm = try guest.makeGuest(maxMemory: options.maxMemory)
        tell(.setup, "a \(vm.backend) guest: \(vm.ram.layout), \(vm.vcpuCount) vCPU(s)"
             + (channels.isEmpty ? "" : ", \(count) channels"))
        // Since version 5 the digest is kept as pages land, so END leaves nothing to read; an older
        // source's is read from memory once all is in.
        let version: UInt32
        if case let .open(open) = opening { version = open.version } else { version = 2 }
        let local = version >= 5 ? PageDigest(pages: vm.pages) : nil
        let written = DirtyBitmap(pages: vm.pages)
        let pageChannels = urgent == nil ? channels : Array(channels.dropLast())
        let postcopy = urgent != nil
        let barrier = PassBarrier(parties: pageChannels.count + 1, timeout: options.timeout)
        // A failure on a further channel releases the barrier and stops every connection, so the main
        // channel stops at once and reports it.
        let all = [connection] + channels
        readers = pageChannels.map { c in
            ChannelReader(onFailure: { barrier.fail(); for c in all { c.interrupt() } }) {
                _ = try applyRecords(from: c, into: vm, guest: guest, written: written, digest: local, barrier: barrier, main: false,
                                 postcopy: postcopy)
            }
        }
        let ending: StreamEnd
        do {
            ending = try applyRecords(from: connection, into: vm, guest: guest, written: written, digest: local, barrier: barrier,
                                      postcopy: postcopy) {
                tell(.receiving, force: false)
            }!
        } catch {
            // Release the other channels; a failure they had first is the one to report.
            barrier.fail()
            for c in channels { c.interrupt() }
            for r in readers { r.join() }
            throw readers.lazy.compactMap(\.failure).first ?? error
        }
        // Every channel closed the last pass before the main one read on: their readers are done.
        for r in readers { r.join() }
        if let e = readers.lazy.compactMap(\.failure).first { throw e }
        switch ending {
        case let .postcopy(state, wanted, silence):
            guard let urgent, let local else { throw MigrationError.badStream("post-copy without its channel") }
            try vm.start(from: state, paused: true)
            loaded = vm
            // From here a source silent this long is gone: the guest here stops.
            for c in all { c.timeout = silence }
            let pc = try PostcopyDestination(vm: vm, wanted: wanted, digest: local, main: connection, urgent: urgent)
            let pages = wanted.pageCount
            tell(.verifying, "post-copy: the guest is loaded, paused, \(formatBytes(pages << 12)) to fetch as it runs; READY")
            do { try Switchover.destination(connection, vm: vm) } catch let e as SwitchoverInDoubt {
                // Without the source nobody serves its missing pages: the guest cannot go on here.
                throw MigrationError.connection("post-copy: \(e.why); the guest cannot run here without the source's pages: discarded")
            }
            tell(.postcopy, "the guest runs here; \(pages) pages follow")
            try pc.run { tell(.postcopy, $0) }
        case let .end(state, digest):
            tell(.verifying, "all records in; checking the memory digest")
            guard local?.value ?? chunkDigest(vm.ram) == digest else { throw MigrationError.digestMismatch }
            if case .legacy = opening {
                try vm.start(from: state)
                loaded = vm
                try connection.send([1])
                try connection.flush()
            } else {
                try vm.start(from: state, paused: true)
                loaded = vm
                tell(.verifying, "memory digest matches; the guest is loaded, paused; READY")
                try Switchover.destination(connection, vm: vm)
            }
        }
        tell(.done, "the source handed the guest over; it runs here")
        return vm
    } catch let e as SwitchoverInDoubt {
        throw e
    } catch {
        if let vm = loaded { _ = try? vm.stop() }
        let reason = MigrationError(describing: error)
        if case .open = opening, reason.toldBy == nil {
            try? connection.sendError(reason)
            // Give the source, busy sending pages, time to read why before this side closes.
            connection.drain(for: 1)
        }
        if case .legacy = opening { try? connection.send([0]); try? connection.flush() }
        for c in channels { c.interrupt() }
        throw connection.isCancelled ? MigrationError.cancelled : reason
    }
}

/// A further channel's records, applied on a thread of their own.
final class ChannelReader: Sendable {
    private let failed = Mutex<Error?>(nil)
    private let done = DispatchSemaphore(value: 0)
    private let joined = Atomic<Bool>(false)

    init(onFailure: @escaping @Sendable () -> Void, _ body: @escaping @Sendable () throws -> Void) {
        Thread { [self] in
            do { try body() } catch {
                failed.withLock { $0 = error }
                onFailure()
            }
            done.signal()
        }.start()
    }

    /// The thread's error, once it ended with one.
    var failure: Error? { failed.withLock { $0 } }

    /// Waits for the thread (once).
    func join() {
        if !joined.exchange(true, ordering: .acquiringAndReleasing) { done.wait() }
    }
}

/// How a stream's pre-copy part ended: with END (the state and the digest), or with POSTCOPY (the
/// state, the pages to fetch, and the seconds of silence after which the source counts as gone).
enum StreamEnd {
    case end(MachineState, digest: [UInt8])
    case postcopy(MachineState, wanted: [UInt64], silence: Double)
}

/// Applies PAGES records to `vm`'s memory (fresh, all zeros) until the END record (or POSTCOPY);
/// returns how the stream ended. `written` tracks which pages records wrote (carry it across a
/// chain of snapshot files), and `digest`, if given, what memory holds where they wrote (across a
/// chain likewise). Every record's checksum (and MAC, on an authenticated connection) is
/// checked first. At each SYNC the channel waits at `barrier` for the others; a further channel
/// (not `main`) ends at the last pass's SYNC and returns nil. DISCARD and POSTCOPY come only on a
/// stream that negotiated a post-copy channel (`postcopy`).
func applyRecords(from connection: Connection, into vm: any VirtualMachine, guest: GuestDescription, written: DirtyBitmap,
                  digest: PageDigest? = nil, barrier: PassBarrier? = nil, main: Bool = true, postcopy: Bool = false,
                  tick: () -> Void = {}) throws -> StreamEnd? {
    let ram = vm.ram
    var buffer: [UInt8] = []   // grown by Record.read to what the records need
    var state: MachineState?
    var sawLastPass = false
    var wanted: [UInt64]?
    // DISCARD comes only between passes (after a SYNC), and no page of a pass after it.
    var closed = false
    var carriedPages = false
    var sums = DigestSums()
    defer { digest?.add(sums) }
    // The new VM's memory reads as zeros: a zero run only needs clearing where data already landed,
    // which keeps the destination from touching (and the host from allocating) memory it need not.
    while true {
        let r = try Record.read(from: connection, pageLimit: ram.pages, into: &buffer)
        tick()
        switch r.type {
        case .pages:
            guard wanted == nil else { throw MigrationError.badStream("a page record after a discard") }
            closed = false
            carriedPages = true
            let run = r.firstPage..<(r.firstPage + UInt64(r.count))
            let (host, slotEnd) = ram.location(page: r.firstPage)
            guard run.upperBound <= slotEnd else {
                throw MigrationError.badStream("page run \(r.firstPage)+\(r.count) crosses the end of a memory slot")
            }
            if r.zero {
                for p in run where written.isSet(p) {
                    memset(host + Int((p - run.lowerBound) << 12), 0, 4096)
                    digest?.set(p, nil, &sums)
                }
            } else {
                buffer.withUnsafeBytes { host.copyMemory(from: $0.baseAddress!, byteCount: Int(r.count) << 12) }
                // Hashed from guest memory as it now is (still in the cache), so the digest checks
                // where the pages landed, not only what arrived.
                if let digest { for p in run { digest.set(p, host + Int((p - run.lowerBound) << 12), &sums) } }
                written.set(first: r.firstPage, count: UInt64(r.count))
            }
        case .error:
            throw r.error(from: .source)!
        case .guest, .channel, .ready, .go, .running, .request, .complete, .dropped:
            throw MigrationError.badStream("a \(r.type) record among the pages")
        case .discard:
            guard main, postcopy, let barrier, closed, let digest else {
                throw MigrationError.badStream("a discard record inside a pass or outside a post-copy migration")
            }
            barrier.noteDiscard()
            // Dropped at once: before the pause the guest still runs on the source.
            var batch = [UInt64](repeating: 0, count: ram.bitmapWords)
            let first = Int(r.firstPage >> 6)
            for i in 0..<Int(r.count) { batch[first + i] = r.payload.le(UInt64.self, at: i * 8) }
            if ram.pages % 64 != 0 { batch[batch.count - 1] &= (1 << (ram.pages % 64)) - 1 }   // no page beyond RAM
            if wanted == nil { wanted = [UInt64](repeating: 0, count: ram.bitmapWords) }
            for i in batch.indices where batch[i] != 0 {
                guard wanted![i] & batch[i] == 0 else { throw MigrationError.badStream("a page named stale twice") }
                wanted![i] |= batch[i]
            }
            try Postcopy.drop(batch, from: ram, digest: digest)
            if r.last && !sawLastPass {
                try connection.sendRecord(.dropped)
                try connection.flush()
            }
        case .postcopy:
            guard main, postcopy else { throw MigrationError.badStream("a post-copy record in a migration that negotiated no post-copy channel") }
            guard sawLastPass else { throw MigrationError.badStream("post-copy before the last pass was closed") }
            guard let state else { throw MigrationError.badStream("no state record before post-copy") }
            let w = wanted ?? [UInt64](repeating: 0, count: ram.bitmapWords)
            guard Postcopy.widened(w, granule: Postcopy.granule(ram.backing)) == w else {
                throw MigrationError.badStream("post-copy names part of a huge page: a \(ram.backing) guest fetches whole ones")
            }
            return .postcopy(state, wanted: w, silence: max(0.1, Double(r.count) / 1000))
        case .sync:
            closed = true
            try barrier?.arrive(pass: r.count, last: r.last, carriedPages: carriedPages)
            carriedPages = false
            sawLastPass = sawLastPass || r.last
            if r.last && !main { return nil }
        case .state:
            guard main else { throw MigrationError.badStream("a state record on a further channel") }
            state = try guest.state(from: r.payload)
        case .end:
            guard main else { throw MigrationError.badStream("an end record on a further channel") }
            guard barrier == nil || sawLastPass else { throw MigrationError.badStream("the end came before the last pass was closed") }
            guard let state else { throw MigrationError.badStream("no state record before the end") }
            return .end(state, digest: r.payload)
        }
    }
}
