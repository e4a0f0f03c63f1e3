import Foundation
import Glibc
import GuestMemory
import DirtyLog
import VirtualMachine

/// A snapshot file's header: like the migration stream's, plus the kind (full or diff), the position
/// in its chain and the chain's id, which every file of the chain carries (docs/migration-stream.md,
/// "Snapshots"). Files of versions 2 (which have no id) to 4 are still read.
public struct SnapshotHeader: Equatable, Sendable {
    public static let magic = Array("VMMSNAP1".utf8)
    public static let version: UInt32 = 5
    public var diff: Bool
    public var sequence: UInt32
    /// Drawn at random for each full snapshot; nil in a version 2 file.
    public var chain: UInt64?
    public var guest: GuestDescription
    /// The file's version (older ones end with the chunk digest).
    public var version: UInt32 = SnapshotHeader.version

    func encoded() -> [UInt8] {
        var b = Self.magic
        b.append(le: Self.version)
        b.append(le: UInt32(diff ? 1 : 0))
        b.append(le: sequence)
        b.append(le: UInt32(4096))
        b.append(le: chain ?? 0)
        return sealHeader(b, guest.encoded())
    }

    static func read(from c: Connection, path: String) throws -> SnapshotHeader {
        let prefix = try c.receive(12)
        guard Array(prefix[0..<8]) == magic else { throw MigrationError.badStream("\(path) is not a snapshot file (bad magic)") }
        let version = prefix.le(UInt32.self, at: 8)
        guard (2...Self.version).contains(version) else {
            throw MigrationError(.version, "\(path) is a version \(version) snapshot; this build reads versions 2 to \(Self.version)")
        }
        let (h, tail) = try readSealedHeader(from: c, fixedSize: version == 2 ? 24 : 32, magic: magic, what: "snapshot file", prefix: prefix)
        guard h.le(UInt32.self, at: 20) == 4096 else { throw MigrationError.badStream("\(path): page size \(h.le(UInt32.self, at: 20))") }
        return SnapshotHeader(diff: h.le(UInt32.self, at: 12) == 1, sequence: h.le(UInt32.self, at: 16),
                              chain: version == 2 ? nil : h.le(UInt64.self, at: 24),
                              guest: try GuestDescription.decode(tail, version: version, context: "\(path): "), version: version)
    }
}

/// What a snapshot wrote.
public struct SnapshotReport: Sendable, CustomStringConvertible {
    public var path: String
    public var diff: Bool
    public var pages: UInt64
    public var bytes: UInt64
    public var pausedSeconds: Double
    public var description: String {
        String(format: "%@ snapshot %@: %llu pages, %@, guest paused %.0f ms", diff ? "diff" : "full", path, pages,
               formatBytes(bytes), pausedSeconds * 1e3)
    }
}

/// A chain of snapshots of one running VM: a full one, then diffs holding the pages dirtied since
/// the previous one (the dirty log, including the VMM's own writes). Each file is written to a
/// temporary name, synced and renamed, so a file either exists complete or not at all; a diff that
/// fails to write puts its pages back into the dirty log, so the next diff still holds them.
public final class SnapshotChain {
    public let vm: any VirtualMachine
    public private(set) var sequence: UInt32 = 0
    /// The current chain's id, new with each full snapshot.
    public private(set) var chain = UInt64.random(in: 1...UInt64.max)
    /// The memory digest as the chain's files left it, kept as their pages are written.
    private var digest: PageDigest?

    /// How the chain logs the guest's writes between snapshots (nil: the VM's default).
    public let strategy: DirtyStrategy?

    public init(vm: any VirtualMachine, strategy: DirtyStrategy? = nil) {
        self.vm = vm
        self.strategy = strategy
    }

    /// Takes the next snapshot into `path`: full for the first, else a diff unless `full` is set.
    @discardableResult
    public func take(to path: String, full: Bool = false) throws -> SnapshotReport {
        let diff = sequence > 0 && !full
        let t0 = Date()
        let wasRunning = vm.runState == .running
        try vm.pause()
        defer { if wasRunning { try? vm.resume() } }
        var bitmap: [UInt64]
        if diff {
            bitmap = try vm.getDirtyLog()
        } else {
            // From here on the dirty log holds what the next diff needs.
            if (try? vm.getDirtyLog()) == nil { try vm.enableDirtyLogging(DirtyLogConfig(strategy: strategy ?? vm.defaultDirtyStrategy)) }
            bitmap = vm.allPages
        }
        let temporary = path + ".partial"
        let chain = diff ? self.chain : UInt64.random(in: 1...UInt64.max)
        do {
            let file = try Connection(file: temporary, writing: true)
            try file.send(SnapshotHeader(diff: diff, sequence: diff ? sequence : 0, chain: chain, guest: GuestDescription(vm)).encoded())
            var report = MigrationReport()
            let digest = diff ? self.digest! : PageDigest(pages: vm.pages)
            try PageSender(ram: vm.ram, connection: file, digest: digest).send(bitmap, report: &report)
            try file.sendState(try vm.saveState())
            try file.sendEnd(digest: digest.value)
            try file.sync()
            guard rename(temporary, path) == 0 else { throw MigrationError.connection("rename to \(path): \(String(cString: strerror(errno)))") }
            sequence = (diff ? sequence : 0) + 1
            self.chain = chain
            self.digest = digest
            return SnapshotReport(path: path, diff: diff, pages: report.pagesSent, bytes: file.bytesSent,
                                  pausedSeconds: Date().timeIntervalSince(t0))
        } catch {
            unlink(temporary)
            // Transactional: what this file would have held is reported by the next one (a failed
            // full one puts every page back, so the next diff holds all of memory).
            try? vm.markDirty(bitmap)
            throw error
        }
    }

    /// Ends the chain: dirty logging off (huge mappings come back on later faults).
    public func finish() {
        try? vm.disableDirtyLogging()
    }
}

/// Checks that file `index` of a chain, with header `h`, follows the full snapshot `first` (nil for
/// the first file itself): its kind, its chain, its guest and its place in the chain.
func checkChainFile(_ h: SnapshotHeader, index: Int, path: String, first: (header: SnapshotHeader, path: String)?) throws {
    if let first {
        guard h.diff else { throw MigrationError.badStream("\(path) is a full snapshot in the middle of a chain") }
        guard h.chain == first.header.chain else {
            func name(_ id: UInt64?) -> String { id.map { String(format: "%016llx", $0) } ?? "none (version 2)" }
            throw MigrationError.badStream("\(path) belongs to chain \(name(h.chain)), not to the chain of \(first.path) (\(name(first.header.chain))): "
                                           + "give the diffs taken after that full snapshot")
        }
        guard h.guest.layout == first.header.guest.layout, h.guest.vcpus == first.header.guest.vcpus else {
            throw MigrationError.badStream("\(path) belongs to another guest (\(h.guest.layout), \(h.guest.vcpus) vCPUs)")
        }
    } else {
        guard !h.diff else { throw MigrationError.badStream("\(path) is a diff: a chain starts with a full snapshot") }
    }
    guard h.sequence == UInt32(index) else {
        throw MigrationError.badStream("\(path) is snapshot \(h.sequence) of its chain; expected \(index): give the files in order")
    }
}

/// Restores a chain (a full snapshot, then its diffs in order) into a new VM, checks the final
/// memory against the last snapshot's digest, and returns the VM with the state to start it from.
public func restoreSnapshots(_ paths: [String]) throws -> (any VirtualMachine, MachineState) {
    guard !paths.isEmpty else { throw MigrationError.badStream("no snapshot files given") }
    var vm: (any VirtualMachine)?
    var last: MachineState?
    var written: DirtyBitmap?   // which pages the files so far wrote
    var digest: PageDigest?     // the memory digest as the version 5 files so far left it
    var first: (header: SnapshotHeader, path: String)?
    for (index, path) in paths.enumerated() {
        let file = try Connection(file: path, writing: false)
        let h = try SnapshotHeader.read(from: file, path: path)
        try checkChainFile(h, index: index, path: path, first: first)
        if index == 0 {
            let guest = try h.guest.makeGuest(context: "\(path): ")
            vm = guest
            written = DirtyBitmap(pages: guest.pages)
            digest = PageDigest(pages: guest.pages)
            first = (h, path)
        }
        // A version 5 file keeps the digest as its pages land; an older one is checked by reading
        // memory. A chain of mixed versions reads memory once the running digest was not kept.
        if h.version < 5 { digest = nil }
        guard case let .end(state, carried) = try applyRecords(from: file, into: vm!, guest: h.guest, written: written!, digest: digest)! else {
            throw MigrationError.badStream("\(path): a post-copy record in a snapshot")
        }
        last = state
        // Every file's digest must hold for the memory as restored up to it.
        let restored = h.version < 5 ? chunkDigest(vm!.ram) : digest?.value ?? memoryDigest(vm!.ram)
        guard restored == carried else { throw MigrationError.digestMismatch }
    }
    return (vm!, last!)
}
