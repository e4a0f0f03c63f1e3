import Glibc
import GuestMemory
import Synchronization

/// One cached translation: a 4 KiB guest frame and the host page with its permissions.
/// Blocks are cached per 4 KiB frame, as a TLB that splinters large pages does.
@frozen
public struct TLBEntry {
    /// gfn + 1; 0 marks an empty entry.
    public var tag: UInt64
    /// Host address of the 4 KiB page, OR'd with the TLB permission bits (below bit 12, see `SoftTLB.bits`).
    public var hostAndPermissions: UInt64
    @inlinable @inline(__always) public init(tag: UInt64, hostAndPermissions: UInt64) {
        self.tag = tag
        self.hostAndPermissions = hostAndPermissions
    }
}

/// A per-vCPU software TLB: two direct-mapped arrays, owned and touched only by its vCPU thread.
/// The first caches 4 KiB frames and is probed inline on every access; the second caches 2 MiB
/// regions of block mappings (2M blocks, and 1G blocks in 2M pieces), probed on a first-level miss,
/// as CPUs keep a separate TLB for large pages.
///
/// Other threads never write the entries. They post a flush request (a range) into the mailbox and
/// wait for the vCPU to acknowledge it at its next safe point, or find it outside guest mode, in which
/// case it will apply the flush before it next enters: the shootdown-by-IPI protocol of a real host.
public final class SoftTLB: @unchecked Sendable {
    public static let entryCount = 4096
    @usableFromInline let entries: UnsafeMutablePointer<TLBEntry>
    @usableFromInline static let mask = UInt64(entryCount - 1)
    public static let blockEntryCount = 512
    @usableFromInline let blocks: UnsafeMutablePointer<TLBEntry>
    @usableFromInline static let blockMask = UInt64(blockEntryCount - 1)

    // Mailbox.
    @usableFromInline let requestSeq = Atomic<UInt64>(0)
    @usableFromInline var seenSeq: UInt64 = 0
    let ackSeq = Atomic<UInt64>(0)
    let inGuest = Atomic<Bool>(false)
    private let pending = Mutex<(lo: UInt64, hi: UInt64)>((.max, 0))

    /// Flushes this TLB applied (full or ranged), and entries they dropped. Read by the owner thread.
    public private(set) var flushes: UInt64 = 0
    public private(set) var entriesDropped: UInt64 = 0

    public init() {
        entries = .allocate(capacity: Self.entryCount)
        entries.initialize(repeating: TLBEntry(tag: 0, hostAndPermissions: 0), count: Self.entryCount)
        blocks = .allocate(capacity: Self.blockEntryCount)
        blocks.initialize(repeating: TLBEntry(tag: 0, hostAndPermissions: 0), count: Self.blockEntryCount)
    }

    deinit {
        entries.deallocate()
        blocks.deallocate()
    }

    /// Permissions as kept in an entry's low 12 bits: R and W at their descriptor positions (6, 7),
    /// X moved down from bit 53 to bit 8. A lookup's `required` uses the same encoding.
    @inlinable @inline(__always)
    public static func bits(_ p: Permissions) -> UInt64 {
        (p.rawValue & (Descriptor.read | Descriptor.write)) | ((p.rawValue & Descriptor.execute) >> 45)
    }

    /// The host address for `gpa` if a cached entry allows `required` (see `bits`); nil on a miss.
    @inlinable @inline(__always)
    public func lookup(_ gpa: GPA, _ required: UInt64) -> UnsafeMutableRawPointer? {
        let gfn = gpa.raw >> 12
        let e = entries[Int(truncatingIfNeeded: gfn & Self.mask)]
        guard e.tag == gfn &+ 1, e.hostAndPermissions & required == required else { return nil }
        return UnsafeMutableRawPointer(bitPattern: UInt(truncatingIfNeeded: (e.hostAndPermissions & ~0xFFF) | gpa.pageOffset))
    }

    @inlinable @inline(__always)
    public func insert(_ gfn: GFN, host: HVA, permissions: Permissions) {
        entries[Int(truncatingIfNeeded: gfn.raw & Self.mask)] =
            TLBEntry(tag: gfn.raw &+ 1, hostAndPermissions: (host.raw & ~0xFFF) | Self.bits(permissions))
    }

    /// Second level: the host address for `gpa` from the 2 MiB block array; nil on a miss.
    @inlinable @inline(__always)
    public func lookupBlock(_ gpa: GPA, _ required: UInt64) -> UnsafeMutableRawPointer? {
        let region = gpa.raw >> 21
        let e = blocks[Int(truncatingIfNeeded: region & Self.blockMask)]
        guard e.tag == region &+ 1, e.hostAndPermissions & required == required else { return nil }
        return UnsafeMutableRawPointer(bitPattern: UInt(truncatingIfNeeded: (e.hostAndPermissions & ~0xFFF) | (gpa.raw & 0x1F_FFFF)))
    }

    /// Caches the 2 MiB region of a block mapping containing `gpa`, whose host address is `host`.
    @inlinable @inline(__always)
    public func insertBlock(_ gpa: GPA, host: HVA, permissions: Permissions) {
        let region = gpa.raw >> 21
        blocks[Int(truncatingIfNeeded: region & Self.blockMask)] =
            TLBEntry(tag: region &+ 1, hostAndPermissions: (host.raw & ~0x1F_FFFF) | Self.bits(permissions))
    }

    /// Safe point: apply any flush posted since the last one. Cheap when there is none.
    @inlinable @inline(__always)
    public func safePoint() {
        if requestSeq.load(ordering: .acquiring) != seenSeq { serviceFlush() }
    }

    /// Marks the vCPU as running guest accesses; applies pending flushes first.
    public func enterGuest() {
        inGuest.store(true, ordering: .sequentiallyConsistent)
        if requestSeq.load(ordering: .sequentiallyConsistent) != seenSeq { serviceFlush() }
    }

    /// Whether the owner is in guest mode (read by the owner thread only).
    public var isInGuest: Bool { inGuest.load(ordering: .relaxed) }

    /// Marks the vCPU as outside guest mode (in a fault, an exit, paused): shootdowns need not wait for it.
    public func exitGuest() {
        inGuest.store(false, ordering: .releasing)
    }

    @usableFromInline
    func serviceFlush() {
        let (range, seq) = pending.withLock { p -> ((UInt64, UInt64), UInt64) in
            let r = (p.lo, p.hi)
            p = (.max, 0)
            return (r, requestSeq.load(ordering: .relaxed))
        }
        if range.0 < range.1 { flush(gfnStart: range.0, gfnEnd: range.1) }
        seenSeq = seq
        ackSeq.store(seq, ordering: .releasing)
    }

    /// Drops the entries for frames [start, end) from both arrays, probing each index when the range
    /// is small and sweeping the array otherwise.
    func flush(gfnStart: UInt64, gfnEnd: UInt64) {
        flushes &+= 1
        entriesDropped &+= Self.drop(entries, Self.entryCount, from: gfnStart, to: gfnEnd)
        entriesDropped &+= Self.drop(blocks, Self.blockEntryCount, from: gfnStart >> 9, to: (gfnEnd + 511) >> 9)
    }

    private static func drop(_ array: UnsafeMutablePointer<TLBEntry>, _ count: Int, from start: UInt64, to end: UInt64) -> UInt64 {
        var dropped: UInt64 = 0
        let mask = UInt64(count - 1)
        if end &- start <= UInt64(count / 4) {
            var k = start
            while k < end {
                let i = Int(truncatingIfNeeded: k & mask)
                if array[i].tag == k &+ 1 { array[i].tag = 0; dropped &+= 1 }
                k &+= 1
            }
        } else {
            for i in 0..<count where array[i].tag != 0 {
                let k = array[i].tag &- 1
                if k >= start && k < end { array[i].tag = 0; dropped &+= 1 }
            }
        }
        return dropped
    }

    /// Posts a flush of [gfnStart, gfnEnd) and returns the sequence number to wait for.
    func post(gfnStart: UInt64, gfnEnd: UInt64) -> UInt64 {
        pending.withLock { p in
            p.lo = min(p.lo, gfnStart)
            p.hi = max(p.hi, gfnEnd)
            return requestSeq.add(1, ordering: .sequentiallyConsistent).newValue
        }
    }

    /// True once the flush numbered `seq` has been applied, or cannot matter yet (vCPU outside guest mode).
    func isDone(_ seq: UInt64) -> Bool {
        ackSeq.load(ordering: .acquiring) >= seq || !inGuest.load(ordering: .sequentiallyConsistent)
    }
}

/// The vCPU TLBs that may cache translations of one stage-2 table, and the shootdown across them.
public final class TLBDomain: @unchecked Sendable {
    private let members = Mutex<[SoftTLB]>([])
    private let shootdownCount = Atomic<UInt64>(0)
    private let shootdownWaitNanos = Atomic<UInt64>(0)
    /// A vCPU that has not acknowledged a shootdown after this long is a bug, not a slow vCPU.
    public static let ackTimeoutSeconds: Double = 10

    public init() {}

    public func register(_ tlb: SoftTLB) { members.withLock { $0.append(tlb) } }
    public func unregister(_ tlb: SoftTLB) { members.withLock { $0.removeAll { $0 === tlb } } }

    /// Shootdowns issued, and the total time spent waiting for acknowledgements.
    public var shootdowns: UInt64 { shootdownCount.load(ordering: .relaxed) }
    public var shootdownWaitNanoseconds: UInt64 { shootdownWaitNanos.load(ordering: .relaxed) }

    /// Invalidates `range` in every vCPU TLB and returns once none can use an old entry for it.
    public func shootdown(_ range: GPARange) {
        #if VMM_UNSAFE_NO_SHOOTDOWN
        // Test-only build setting: shows the stale-translation tests fail without the shootdown.
        return
        #endif
        let gfnStart = range.start.raw >> 12
        let gfnEnd = (range.end.raw + 0xFFF) >> 12
        let tlbs = members.withLock { $0 }
        guard !tlbs.isEmpty else { return }
        shootdownCount.add(1, ordering: .relaxed)
        let seqs = tlbs.map { $0.post(gfnStart: gfnStart, gfnEnd: gfnEnd) }
        let t0 = monotonicNanos()
        for (tlb, seq) in zip(tlbs, seqs) {
            var spins = 0
            while !tlb.isDone(seq) {
                spins += 1
                if spins > 64 { sched_yield() }
                if spins & 0xFFFF == 0, Double(monotonicNanos() - t0) > Self.ackTimeoutSeconds * 1e9 {
                    preconditionFailure("TLB shootdown of \(range) not acknowledged within \(Self.ackTimeoutSeconds) s: a vCPU is stuck in guest mode without reaching a safe point")
                }
            }
        }
        shootdownWaitNanos.add(monotonicNanos() - t0, ordering: .relaxed)
    }
}
