import Foundation
import Glibc
import GuestMemory
import DirtyLog
import VirtualMachine

/// A snapshot chain restored on demand (Firecracker's userfaultfd restore): the files are scanned
/// for where each page's last copy lies (headers only), the guest starts with its memory absent, and
/// a page is read from its file, checksum checked, when a vCPU first touches it, while a filler puts
/// the rest in place behind it (`prefault`). Once every page is in, memory is checked against the
/// last file's digest. Needs version 5 files (their running digest) and a backing faulted in 4 KiB
/// pages (not hugetlb). Its threads hold it until `finish` or `cancel`: call one of them.
public final class LazyRestore: @unchecked Sendable {   // shared state under `condition`; threads below
    public let vm: any VirtualMachine
    public let state: MachineState
    /// Seconds from the call until the guest could start: the chain scanned, its memory registered.
    public let openSeconds: Double
    /// Seconds from the call until every page was in place.
    public private(set) var fullSeconds: Double?
    /// Pages read because a vCPU touched them first.
    public private(set) var faultedPages: UInt64 = 0

    private struct Run { var file: Int; var offset: Int; var first: UInt64; var count: UInt64; var zero: Bool }
    private let runs: [Run]
    /// Per RAM page, the run holding its last copy.
    private let owner: [UInt32]
    /// Each file of the chain, open once: its header was read through it, its records are read
    /// from it at their offsets.
    private let files: [Connection]
    private let faults: MissingPages
    private let digest: PageDigest
    private let expected: [UInt8]
    private let started = Date()
    private let condition = NSCondition()
    private var absent: [UInt64]
    private var left: UInt64
    private var failure: Error?
    private var stopping = false
    private var threads = 0

    /// Scans the chain (a full snapshot, then its diffs in order), makes the VM and registers its
    /// memory. Start the guest with `start`, then `finish` to have every page in place and checked.
    public init(_ paths: [String]) throws {
        guard !paths.isEmpty else { throw MigrationError.badStream("no snapshot files given") }
        var first: (header: SnapshotHeader, path: String)?
        var runs: [Run] = []
        var owner: [UInt32] = []
        var files: [Connection] = []
        var state: MachineState?, expected: [UInt8] = []
        var vm: (any VirtualMachine)?
        for (index, path) in paths.enumerated() {
            let c = try Connection(file: path, writing: false)
            let h = try SnapshotHeader.read(from: c, path: path)
            try checkChainFile(h, index: index, path: path, first: first)
            guard h.version >= 5 else {
                throw MigrationError.badStream("\(path) is a version \(h.version) snapshot; a lazy restore needs version 5 files: restore it without --lazy")
            }
            if index == 0 {
                guard Postcopy.granule(Backing(wireCode: h.guest.backing)) == 1 else {
                    throw MigrationError.badStream("\(path): a lazy restore places 4 KiB pages; this \(Backing(wireCode: h.guest.backing)) guest restores without --lazy")
                }
                vm = try h.guest.makeGuest(context: "\(path): ")
                owner = [UInt32](repeating: .max, count: Int(vm!.pages))
                first = (h, path)
            }
            files.append(c)
            (state, expected) = try Self.scan(c, from: Int(c.bytesReceived), path: path, file: files.count - 1, guest: h.guest,
                                              ram: vm!.ram, runs: &runs, owner: &owner)
        }
        // The full snapshot holds every page.
        if let p = owner.firstIndex(of: .max) { throw MigrationError.badStream("\(paths[0]) holds no copy of page \(p)") }
        self.vm = vm!
        self.state = state!
        self.runs = runs
        self.owner = owner
        self.files = files
        self.expected = expected
        digest = PageDigest(pages: vm!.pages)
        let ram = vm!.ram
        absent = [UInt64](repeating: ~0, count: ram.bitmapWords)
        if ram.pages % 64 != 0 { absent[absent.count - 1] = (1 << (ram.pages % 64)) - 1 }
        left = ram.pages
        do {
            // Whatever making the VM wrote goes: every page comes from the files.
            for m in ram.slots { try m.discard(offset: 0, length: m.size) }
            faults = try MissingPages(ram: ram)
        } catch {
            throw MigrationError.vm("a lazy restore needs userfaultfd", cause: error)
        }
        openSeconds = Date().timeIntervalSince(started)
    }

    deinit {
        condition.lock()
        stopping = true
        condition.unlock()
        faults.release()
    }

    /// Starts the guest (paused if asked), serving its faults; with `prefault` a filler puts every
    /// page in place meanwhile, else pages come only when touched until `finish`.
    public func start(paused: Bool = false, prefault: Bool = true) throws {
        spawn { [self] in
            while !isStopping {
                for p in try faults.waitForFaults(timeout: 0.05) { try load(Int(owner[Int(p)]), faulted: true) }
            }
        }
        if prefault { spawn { [self] in try fill() } }
        do {
            try checkGoing()
            try vm.start(from: state, paused: paused)
            // A failure or a cancel before the guest was up stopped nothing: stop it now.
            try checkGoing()
        } catch {
            cancel()
            throw error
        }
    }

    /// Gives up: stops the guest and the threads serving it. The guest's memory is then not the
    /// snapshot's.
    public func cancel() {
        condition.withLock {
            if failure == nil { failure = MigrationError.cancelled }
            stopping = true
            condition.broadcast()
        }
        faults.release()
        faults.wake()
        _ = try? vm.stop()
        condition.lock()
        while threads > 0 { condition.wait() }
        condition.unlock()
    }

    /// Puts every page still absent in place (within `timeout` seconds), checks memory against the
    /// chain's digest and stops faulting. A failure (a file changed or unreadable, the digest
    /// disagreeing) stops the guest, whose memory is then not the snapshot's, and is thrown.
    public func finish(timeout: Double = 600) throws {
        do {
            try fill()
            condition.lock()
            let deadline = Date().addingTimeInterval(timeout)
            while left > 0 && failure == nil && !stopping {
                guard condition.wait(until: deadline) else { condition.unlock(); throw MigrationError.timeout("\(left) pages to put in place") }
            }
            let failed = failure ?? (left > 0 ? MigrationError.cancelled : nil)
            stopping = true
            faults.wake()
            while threads > 0 { condition.wait() }
            condition.unlock()
            if let failed { throw failed }
            guard digest.value == expected else { throw MigrationError.digestMismatch }
            faults.release()
        } catch {
            cancel()
            throw error
        }
    }

    /// Throws the first failure, or `cancelled` once `cancel` was called.
    private func checkGoing() throws {
        if let failed = condition.withLock({ failure ?? (stopping ? MigrationError.cancelled : nil) }) { throw failed }
    }

    private var isStopping: Bool { condition.lock(); defer { condition.unlock() }; return stopping || failure != nil }

    private func spawn(_ body: @escaping @Sendable () throws -> Void) {
        condition.lock(); threads += 1; condition.unlock()
        Thread { [self] in
            do { try body() } catch {
                let first = condition.withLock {
                    defer { condition.broadcast() }
                    guard failure == nil else { return false }
                    failure = error
                    return true
                }
                // A vCPU may wait on a page nobody will place: wake it (onto zeros), then stop the
                // guest at once, before it runs on far on memory that is not the snapshot's.
                if first {
                    faults.release()
                    faults.wake()
                    _ = try? vm.stop()
                }
            }
            condition.lock(); threads -= 1; condition.broadcast(); condition.unlock()
        }.start()
    }

    /// Puts every run's pages in place, in file order (runs later files replaced are skipped).
    private func fill() throws {
        for i in runs.indices where !isStopping { try load(i, faulted: false) }
    }

    /// Reads run `i` and places its pages that are still absent and whose last copy it holds.
    private func load(_ i: Int, faulted: Bool) throws {
        let run = runs[i]
        var pieces: [(UInt64, UInt64)] = []
        condition.lock()
        var p = run.first
        while p < run.first + run.count {
            let n = absent.takeRun(from: p, upTo: run.first + run.count - p) { owner[Int($0)] == UInt32(i) }
            if n > 0 { pieces.append((p, n)) }
            p += max(n, 1)
        }
        condition.unlock()
        guard !pieces.isEmpty else { return }
        let (h, payload) = try Self.read(files[run.file], at: run.offset, payload: run.zero ? 0 : Int(run.count) << 12, pageLimit: vm.pages)
        guard h[0] == RecordType.pages.rawValue, h.le(UInt64.self, at: 8) == run.first, UInt64(h.le(UInt32.self, at: 4)) == run.count,
              (h[1] & Record.zeroRun != 0) == run.zero else {
            throw MigrationError.badStream("a snapshot file changed under the restore (the record at byte \(run.offset) is not the one scanned)")
        }
        var sums = DigestSums()
        for (first, n) in pieces {
            let done: Bool
            if run.zero {
                done = try faults.placeZeros(page: first, count: n)
            } else {
                let bytes = payload.withUnsafeBytes { $0.baseAddress! + Int((first - run.first) << 12) }
                done = try faults.place(page: first, count: n, from: bytes)
                for k in 0..<n { digest.set(first + k, bytes + Int(k << 12), &sums) }
            }
            guard done else { throw MigrationError.vm("pages \(first)+\(n) were present before the restore placed them") }
        }
        digest.add(sums)
        condition.lock()
        let placed = pieces.reduce(0) { $0 + $1.1 }
        left -= placed
        if faulted { faultedPages += placed }
        if left == 0 {
            fullSeconds = Date().timeIntervalSince(started)
            condition.broadcast()
        }
        condition.unlock()
    }

    /// Reads the record at `offset` (its payload `payload` bytes long), checks its sizes and
    /// checksum, and returns its header and payload.
    private static func read(_ file: Connection, at offset: Int, payload: Int, pageLimit: UInt64) throws -> ([UInt8], [UInt8]) {
        let b = try file.bytes(Record.headerSize + payload, at: offset)
        guard b.count == Record.headerSize + payload else { throw MigrationError.badStream("a snapshot file ends early (truncated or changed)") }
        let h = Array(b[0..<Record.headerSize])
        try Record.check(h, pageLimit: pageLimit)
        guard Int(h.le(UInt32.self, at: 16)) == payload else { throw MigrationError.badStream("a snapshot file changed under the restore") }
        guard b.withUnsafeBytes({ Record.checksumMatches($0, UnsafeRawBufferPointer(rebasing: $0[Record.headerSize...])) }) else { throw MigrationError.badStream("checksum mismatch in a snapshot record at byte \(offset)") }
        return (h, Array(b[Record.headerSize...]))
    }

    /// Walks one file's records from `offset` by their headers, noting where each page's copy lies
    /// (later files replace earlier ones); reads and checks STATE and END. Returns them.
    private static func scan(_ source: Connection, from start: Int, path: String, file: Int, guest: GuestDescription, ram: GuestRAM,
                             runs: inout [Run], owner: inout [UInt32]) throws -> (MachineState, [UInt8]) {
        var offset = start
        var state: MachineState?
        while true {
            let h = try source.bytes(Record.headerSize, at: offset)
            guard h.count == Record.headerSize else { throw MigrationError.badStream("\(path) ends early, at byte \(offset) (truncated)") }
            try Record.check(h, pageLimit: ram.pages)
            let length = Int(h.le(UInt32.self, at: 16))
            switch RecordType(rawValue: h[0])! {
            case .pages:
                let first = h.le(UInt64.self, at: 8), count = UInt64(h.le(UInt32.self, at: 4))
                guard first + count <= ram.location(page: first).slotEnd else {
                    throw MigrationError.badStream("\(path): page run \(first)+\(count) crosses the end of a memory slot")
                }
                guard runs.count < Int(UInt32.max) else { throw MigrationError.badStream("\(path): too many records") }
                runs.append(Run(file: file, offset: offset, first: first, count: count, zero: h[1] & Record.zeroRun != 0))
                for p in first..<(first + count) { owner[Int(p)] = UInt32(runs.count - 1) }
            case .state:
                state = try guest.state(from: try read(source, at: offset, payload: length, pageLimit: ram.pages).1, context: "\(path): ")
            case .end:
                guard let state else { throw MigrationError.badStream("\(path): no state record before the end") }
                return (state, try read(source, at: offset, payload: length, pageLimit: ram.pages).1)
            default:
                throw MigrationError.badStream("\(path): a \(RecordType(rawValue: h[0])!) record in a snapshot")
            }
            offset += Record.headerSize + length
        }
    }
}
