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
public final class SoftTLB: @unchecked Sendable {   // entries are the owner vCPU's; other threads only post flushes through the mailbox atomics
    public static let entryCount = 4096
    @usableFromInline let entries: UnsafeMutablePointer<TLBEntry>
    @usableFromInline static let mask = UInt64(entryCount - 1)
    public static let blockEntryCount = 512
    @usableFromInline let blocks: UnsafeMutablePointer<TLBEntry>
    @usableFromInline static let blockMask = UInt64(blockEntryCount - 1)

    // Mailbox.
    @usableFromInline let requestSeq = Atomic<UInt64>(0)
    @exclusivity(unchecked) @usableFromInline var seenSeq: UInt64 = 0
    let ackSeq = Atomic<UInt64>(0)
    let inGuest = Atomic<Bool>(false)
    private let pending = Mutex<(lo: UInt64, hi: UInt64)>((.max, 0))

    /// Pages this vCPU dirtied through writable-clean (DBM) leaves and has not published yet: the
    /// leaf stays clean and only this TLB gets W (Intel PML's log buffer, in software). Published into
    /// the slot bitmaps when full, at every acknowledged shootdown and when leaving guest mode, so a
    /// harvest that first shoots down every TLB sees them all.
    @usableFromInline let dirtyBuffer: UnsafeMutablePointer<UInt64>
    @exclusivity(unchecked) @usableFromInline var dirtyCount = 0
    @usableFromInline static let dirtyBufferCapacity = 512
    /// Paging-structure cache: the last-level table behind the 2 MiB region walked last (as MMUs
    /// cache upper-level entries), so a TLB miss in that region reads one descriptor instead of
    /// descending four levels. Dropped at every flush: a table is unlinked only together with a
    /// shootdown, and freed only after every vCPU has acknowledged it.
    @exclusivity(unchecked) @usableFromInline var walkRegion: UInt64 = 0     // (gpa >> 21) + 1; 0: empty
    @exclusivity(unchecked) @usableFromInline var walkTable = UnsafeMutablePointer<Atomic<UInt64>>(bitPattern: 8)!

    /// The leaf for `gpa` from the cached last-level table, if the region matches and it is valid.
    @inlinable @inline(__always)
    public func cachedWalk(_ gpa: GPA) -> Translation? {
        guard walkRegion == (gpa.raw >> 21) &+ 1 else { return nil }
        let e = DescriptorPointer(walkTable + Stage2Geometry.index(gpa.raw, 3))
        let d = e.load()
        return d.isValid ? Translation(leaf: d, level: 3, entry: e) : nil
    }

    /// Caches the last-level table a walk for `gpa` ended in.
    @inlinable @inline(__always)
    public func rememberWalk(_ gpa: GPA, _ t: Translation) {
        guard t.level == 3 else { return }
        walkRegion = (gpa.raw >> 21) &+ 1
        walkTable = t.entry.base - Stage2Geometry.index(gpa.raw, 3)
    }

    /// The domain whose targets this TLB publishes into (set when registered).
    @usableFromInline unowned(unsafe) var domain: TLBDomain?

    /// Flushes this TLB applied (full or ranged), and entries they dropped. Read by the owner thread.
    public private(set) var flushes: UInt64 = 0
    public private(set) var entriesDropped: UInt64 = 0

    public init() {
        entries = .allocate(capacity: Self.entryCount)
        entries.initialize(repeating: TLBEntry(tag: 0, hostAndPermissions: 0), count: Self.entryCount)
        blocks = .allocate(capacity: Self.blockEntryCount)
        blocks.initialize(repeating: TLBEntry(tag: 0, hostAndPermissions: 0), count: Self.blockEntryCount)
        dirtyBuffer = .allocate(capacity: Self.dirtyBufferCapacity)
    }

    deinit {
        entries.deallocate()
        blocks.deallocate()
        dirtyBuffer.deallocate()
    }

    /// Logs a write through a writable-clean leaf of frame `gfn`, before the write is made (in guest
    /// mode, by the owner). Only logged writes that are done get published: a full buffer is published
    /// before this entry goes in, never with it (a harvest taking the entry before its write lands
    /// would copy the page too early, and nothing would report it again).
    @inlinable @inline(__always)
    public func logDirty(_ gfn: GFN) {
        if dirtyCount == Self.dirtyBufferCapacity { publishDirty() }
        dirtyBuffer[dirtyCount] = gfn.raw
        dirtyCount &+= 1
    }

    /// Publishes the logged frames into their slots' bitmaps. Owner thread, in guest mode.
    @usableFromInline @inline(never)
    func publishDirty() {
        guard dirtyCount > 0 else { return }
        domain?.publish(dirtyBuffer, count: dirtyCount)
        dirtyCount = 0
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

    /// Marks the vCPU as outside guest mode (in a fault, an exit, paused): shootdowns need not wait for
    /// it, so what it logged is published first.
    public func exitGuest() {
        if dirtyCount > 0 { publishDirty() }
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
        walkRegion = 0
        publishDirty()
        seenSeq = seq
        ackSeq.store(seq, ordering: .releasing)
    }

    /// Drops the entries for frames [start, end) from both arrays, probing each index when the range
    /// is small and sweeping the array otherwise.
    func flush(gfnStart: UInt64, gfnEnd: UInt64) {
        flushes &+= 1
        walkRegion = 0
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
public final class TLBDomain: @unchecked Sendable {   // members under a Mutex; counters atomic
    private let members = Mutex<[SoftTLB]>([])
    private let shootdownCount = Atomic<UInt64>(0)
    private let shootdownWaitNanos = Atomic<UInt64>(0)
    /// A vCPU that has not acknowledged a shootdown after this long is a bug, not a slow vCPU.
    public static let ackTimeoutSeconds: Double = 10

    public init() {}

    public func register(_ tlb: SoftTLB) {
        tlb.domain = self
        members.withLock { $0.append(tlb) }
    }
    public func unregister(_ tlb: SoftTLB) { members.withLock { $0.removeAll { $0 === tlb } } }

    /// The current DirtyTargets, retained (a bit pattern of Unmanaged; 0 for none).
    private let targets = Atomic<UInt>(0)

    deinit { replaceDirtyTargets(nil)?.release() }

    /// Publishes `count` frames a vCPU logged. Sequentially consistent with the MMU's replacement and
    /// its reading of the vCPU's guest-mode flag: either the MMU waits for this vCPU, or this reads
    /// the new targets.
    func publish(_ frames: UnsafeMutablePointer<UInt64>, count: Int) {
        let bits = targets.load(ordering: .sequentiallyConsistent)
        guard bits != 0 else { return }
        Unmanaged<DirtyTargets>.fromOpaque(UnsafeRawPointer(bitPattern: bits)!)._withUnsafeGuaranteedRef { $0.mark(frames, count: count) }
    }

    /// Points vCPUs at the bitmaps of the DBM-logging slots (their ranges and bitmaps) if they
    /// changed; the caller then shoots down every TLB, after which the old targets are released.
    /// Under the MMU's exclusive lock.
    func setDirtyTargets(_ list: [(range: GPARange, bitmap: DirtyBitmap)]) -> Bool {
        let bits = targets.load(ordering: .acquiring)
        if bits != 0, Unmanaged<DirtyTargets>.fromOpaque(UnsafeRawPointer(bitPattern: bits)!).takeUnretainedValue().same(as: list) {
            return false
        }
        if bits == 0 && list.isEmpty { return false }
        let old = replaceDirtyTargets(list.isEmpty ? nil : DirtyTargets(list))
        // Every vCPU in guest mode passes a safe point (publishing what it logged, into the old
        // targets or the new) before the old ones go.
        shootdown(GPARange(start: GPA(0), end: GPA(1 << 52)))
        old?.release()
        return true
    }

    @discardableResult
    private func replaceDirtyTargets(_ new: DirtyTargets?) -> Unmanaged<DirtyTargets>? {
        let newBits = new.map { UInt(bitPattern: Unmanaged.passRetained($0).toOpaque()) } ?? 0
        let oldBits = targets.exchange(newBits, ordering: .sequentiallyConsistent)
        return oldBits == 0 ? nil : Unmanaged<DirtyTargets>.fromOpaque(UnsafeRawPointer(bitPattern: oldBits)!)
    }

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

/// Where vCPUs publish the pages they dirtied through writable-clean (DBM) leaves: each DBM-logging
/// slot's range and bitmap, immutable. The MMU replaces it whenever those slots change
/// (read-copy-update): a vCPU reads it only while in guest mode, and the MMU releases the old one only
/// after a shootdown every vCPU in guest mode has acknowledged.
final class DirtyTargets: @unchecked Sendable {   // immutable after init; the words it points to are atomics
    let starts: UnsafeMutablePointer<UInt64>
    let ends: UnsafeMutablePointer<UInt64>
    /// The bitmaps' words, raw: publishing touches no reference count.
    let words: UnsafeMutablePointer<UnsafeMutablePointer<Atomic<UInt64>>>
    let count: Int
    /// Keeps the bitmaps alive as long as their words are reachable here.
    let bitmaps: [DirtyBitmap]

    init(_ targets: [(range: GPARange, bitmap: DirtyBitmap)]) {
        count = targets.count
        starts = .allocate(capacity: max(1, count))
        ends = .allocate(capacity: max(1, count))
        words = .allocate(capacity: max(1, count))
        for (i, t) in targets.enumerated() {
            starts[i] = t.range.start.raw >> 12
            ends[i] = t.range.end.raw >> 12
            words[i] = t.bitmap.atomicWords
        }
        bitmaps = targets.map(\.bitmap)
    }

    deinit {
        starts.deallocate()
        ends.deallocate()
        words.deallocate()
    }

    func same(as targets: [(range: GPARange, bitmap: DirtyBitmap)]) -> Bool {
        targets.count == count && targets.indices.allSatisfy {
            targets[$0].range.start.raw >> 12 == starts[$0] && targets[$0].range.end.raw >> 12 == ends[$0] && targets[$0].bitmap === bitmaps[$0]
        }
    }

    /// Marks `count` frames in the bitmaps of the slots holding them, one atomic OR per run of frames
    /// sharing a word (a sequential writer's 64 pages cost one). A frame no DBM slot holds any more
    /// (deleted, moved, logging stopped) has nobody to tell.
    func mark(_ frames: UnsafeMutablePointer<UInt64>, count n: Int) {
        var target = -1, word = -1
        var mask: UInt64 = 0
        for k in 0..<n {
            let gfn = frames[k]
            if target < 0 || gfn < starts[target] || gfn >= ends[target] {
                var found = -1
                for i in 0..<count where gfn >= starts[i] && gfn < ends[i] { found = i; break }
                guard found >= 0 else { continue }
                if mask != 0 { Self.or(words[target], word, mask) }
                target = found
                word = -1
                mask = 0
            }
            let page = gfn - starts[target]
            let w = Int(truncatingIfNeeded: page >> 6)
            if w != word {
                if mask != 0 { Self.or(words[target], word, mask) }
                word = w
                mask = 0
            }
            mask |= 1 << (page & 63)
        }
        if mask != 0 { Self.or(words[target], word, mask) }
    }

    @inline(__always)
    static func or(_ words: UnsafeMutablePointer<Atomic<UInt64>>, _ w: Int, _ mask: UInt64) {
        // Release: a harvest that sees the bits sees the writes logged before them.
        if words[w].load(ordering: .relaxed) & mask != mask { words[w].bitwiseOr(mask, ordering: .releasing) }
    }
}
