import Foundation
import Glibc
import GuestMemory

/// The digest of all guest RAM that END carries, checked by the destination (and by a restore)
/// against the memory it built (docs/migration-stream.md, "The memory digest"). It catches pages
/// lost or garbled on the way; the stream's authenticity, when a key is given, comes from the MAC.
///
/// Since version 5 it is a sum over pages: each RAM page p whose bytes are not all zero contributes
/// h(p), a 64-bit hash of its bytes and its number, to four 64-bit sums (lane i adds a different
/// mix of h(p)). A page written again takes its old contribution out and puts the new one in, so
/// both ends keep the digest as pages go out and come in, and END costs nothing to compute however
/// large the guest (versions 2 to 4 hashed 64 MiB chunks, which left up to a chunk per dirty page
/// to read in the pause).
struct DigestSums: Sendable, Equatable {
    var lanes: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)

    init() {}

    private static let mixes: (UInt64, UInt64, UInt64, UInt64) = (0x9E37_79B1_85EB_CA87, 0xC2B2_AE3D_27D4_EB4F, 0x1656_67B1_9E37_79F9, 0x85EB_CA77_C2B2_AE63)

    /// Adds (or, `removing`, takes out) a page hash.
    @inline(__always)
    mutating func add(_ h: UInt64, removing: Bool = false) {
        let m = Self.mixes
        let (a, b, c, d) = (avalanche(h ^ m.0), avalanche(h ^ m.1), avalanche(h ^ m.2), avalanche(h ^ m.3))
        if removing {
            lanes = (lanes.0 &- a, lanes.1 &- b, lanes.2 &- c, lanes.3 &- d)
        } else {
            lanes = (lanes.0 &+ a, lanes.1 &+ b, lanes.2 &+ c, lanes.3 &+ d)
        }
    }

    mutating func add(_ other: DigestSums) {
        lanes = (lanes.0 &+ other.lanes.0, lanes.1 &+ other.lanes.1, lanes.2 &+ other.lanes.2, lanes.3 &+ other.lanes.3)
    }

    /// The 32 bytes END carries.
    var bytes: [UInt8] {
        var out: [UInt8] = []
        for lane in [lanes.0, lanes.1, lanes.2, lanes.3] { out.append(le: lane) }
        return out
    }

    static func == (a: DigestSums, b: DigestSums) -> Bool { a.bytes == b.bytes }

    /// h(p): the page's record checksum, in 64 bits, mixed with its RAM page number; never 0 (which
    /// stands for a zero page).
    @inline(__always)
    static func hash(page p: UInt64, _ bytes: UnsafeRawPointer) -> UInt64 {
        var c = RecordChecksum()
        c.update(UnsafeRawBufferPointer(start: bytes, count: 4096))
        let h = avalanche(c.value64 ^ p &* 0x9E37_79B9_7F4A_7C15)
        return h == 0 ? 1 : h
    }
}

@inline(__always)
func avalanche(_ x: UInt64) -> UInt64 {
    var h = x
    h ^= h >> 33; h = h &* 0xC2B2_AE3D_27D4_EB4F; h ^= h >> 29; h = h &* 0x9E37_79B1_85EB_CA87; h ^= h >> 32
    return h
}

/// The version 5 digest of memory as it goes out or comes in: each RAM page's hash as last sent or
/// applied (0 for zeros), and the sums. Threads may update it at once for different pages (each
/// keeps its own sums and hands them in with `add`), as the channels of one pass do: a pass names a
/// page once, and passes are separated by the SYNC barrier.
final class PageDigest: @unchecked Sendable {   // each page hash is written by the one channel that placed it; the total under `lock`
    let pages: UInt64
    private let hashes: UnsafeMutablePointer<UInt64>
    private let lock = NSLock()
    private var total = DigestSums()

    init(pages: UInt64) {
        self.pages = pages
        // Zeroed, and left to the kernel to back as pages are first written.
        hashes = calloc(Int(max(1, pages)), 8)!.assumingMemoryBound(to: UInt64.self)
    }

    deinit { free(hashes) }

    /// Page `p` now holds `bytes` (nil: zeros); the change goes into `sums`.
    @inline(__always)
    func set(_ p: UInt64, _ bytes: UnsafeRawPointer?, _ sums: inout DigestSums) {
        let old = hashes[Int(p)]
        // A page of zeros counts as none, however it came (a data record may carry one).
        let new = bytes.map { isZeroPage($0) ? 0 : DigestSums.hash(page: p, $0) } ?? 0
        guard old != new else { return }
        if old != 0 { sums.add(old, removing: true) }
        if new != 0 { sums.add(new) }
        hashes[Int(p)] = new
    }

    /// Hands in a thread's sums.
    func add(_ sums: DigestSums) { lock.withLock { total.add(sums) } }

    /// The digest of every page set so far.
    var value: [UInt8] { lock.withLock { total.bytes } }
}

/// The version 5 digest of `ram` as it is, every page read (on every core): what a restore whose
/// files carried no running digest, or a test, checks against.
public func memoryDigest(_ ram: GuestRAM) -> [UInt8] {
    let blocks = Int((ram.pages + 4095) / 4096)
    // Each iteration writes its own element.
    nonisolated(unsafe) let parts = UnsafeMutablePointer<DigestSums>.allocate(capacity: max(1, blocks))
    defer { parts.deallocate() }
    DispatchQueue.concurrentPerform(iterations: blocks) { b in
        var sums = DigestSums()
        for p in UInt64(b * 4096)..<min(ram.pages, UInt64(b + 1) * 4096) {
            let page = UnsafeRawPointer(ram.pointer(page: p))
            if !isZeroPage(page) { sums.add(DigestSums.hash(page: p, page)) }
        }
        (parts + b).initialize(to: sums)
    }
    var total = DigestSums()
    for b in 0..<blocks { total.add(parts[b]) }
    return total.bytes
}

// Written once, then only read.
nonisolated(unsafe) private let zeroPage = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096).initializeMemory(as: UInt8.self, repeating: 0, count: 4096)

/// Whether a 4 KiB page holds only zeros.
@inline(__always)
func isZeroPage(_ page: UnsafeRawPointer) -> Bool { memcmp(page, zeroPage, 4096) == 0 }

/// Bytes per chunk of the version 2 to 4 digest.
let chunkDigestSize = 64 << 20

/// The digest versions 2 to 4 carry: each slot hashed in 64 MiB chunks (a slot's last chunk may be
/// shorter) with the four lanes of the record checksum, the chunks' lanes hashed again. Read from
/// memory in full (on every core) when an older stream or snapshot ends.
public func chunkDigest(_ ram: GuestRAM) -> [UInt8] {
    var chunks: [(UnsafeMutableRawPointer, Int)] = []
    for m in ram.slots {
        var offset = 0
        while offset < Int(m.size) {
            chunks.append((m.pointer + offset, min(chunkDigestSize, Int(m.size) - offset)))
            offset += chunkDigestSize
        }
    }
    // Each iteration reads its own chunk and writes its own lanes.
    nonisolated(unsafe) let lanes = UnsafeMutablePointer<UInt64>.allocate(capacity: max(1, chunks.count * 4))
    defer { lanes.deallocate() }
    chunks.withUnsafeBufferPointer { chunks in
        nonisolated(unsafe) let chunks = chunks
        DispatchQueue.concurrentPerform(iterations: chunks.count) { i in
            var h = RecordChecksum()
            h.update(UnsafeRawBufferPointer(start: chunks[i].0, count: chunks[i].1))
            for (j, l) in h.finalLanes.enumerated() { lanes[i * 4 + j] = l }
        }
    }
    var h = RecordChecksum()
    h.update(UnsafeRawBufferPointer(start: lanes, count: chunks.count * 32))
    var out: [UInt8] = []
    for lane in h.finalLanes { out.append(le: lane) }
    return out
}
