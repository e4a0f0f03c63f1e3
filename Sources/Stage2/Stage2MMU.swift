import Foundation
import DirtyLog
import GuestMemory
import Synchronization

/// What a vCPU's hardware walk found for an address.
@frozen
public struct Translation {
    public let leaf: Descriptor
    public let level: Int
    public let entry: DescriptorPointer
    @inlinable @inline(__always) public init(leaf: Descriptor, level: Int, entry: DescriptorPointer) {
        self.leaf = leaf
        self.level = level
        self.entry = entry
    }
    /// The leaf as a shared walk's visit sees it, for a change made outside a walk.
    @inlinable @inline(__always) public func context(_ gpa: GPA) -> VisitContext {
        VisitContext(entry: entry, old: leaf, addr: gpa.alignedDown(to: Stage2Geometry.entrySize(level)), level: level, shared: true)
    }
    /// Host address of the 4 KiB page containing the guest address.
    @inlinable @inline(__always) public func hostPage(for gpa: GPA) -> HVA {
        let size = Stage2Geometry.entrySize(level)
        return leaf.output + ((gpa.raw & (size - 1)) & ~0xFFF)
    }
}

/// How a stage-2 fault was resolved.
public enum FaultOutcome: Equatable, Sendable, CustomStringConvertible {
    /// A leaf of this size now maps the address: retry the access.
    case mapped(PageSize)
    /// Nothing to install (another vCPU won, a break-before-make or an invalidation was in flight,
    /// or the fault was spurious): retry the access.
    case retry
    /// No memslot holds the address: exit to the VMM for device emulation. The host was not touched.
    case mmio(GPA, AccessKind)
    /// A write to a read-only memslot: exit to the VMM.
    case readOnlyWrite(GPA, slot: Int)
    /// A permission the slot does not grant and nothing here can resolve: exit to the VMM.
    case permission(GPA, AccessKind, Descriptor)
    /// The faulting vCPU's dirty ring is full: exit to the VMM and wait for a reset.
    case dirtyRingFull

    public var description: String {
        switch self {
        case let .mapped(s): return "mapped \(s)"
        case .retry: return "retry"
        case let .mmio(g, a): return "MMIO \(a) at \(g)"
        case let .readOnlyWrite(g, s): return "write to read-only slot \(s) at \(g)"
        case let .permission(g, a, d): return "permission fault: \(a) at \(g), leaf \(d)"
        case .dirtyRingFull: return "dirty ring full"
        }
    }
}

/// The stage-2 MMU of one VM: the memslot map, the guest-physical -> host table, the TLBs that cache
/// it, and the MMU-notifier state. Every operation on the table is a visitor on the one walker.
public final class Stage2MMU: @unchecked Sendable {   // lock-guarded state (`lock`, `nestedLock`); descriptors are atomics
    public let ipaBits: Int
    public let startLevel: Int
    public let root: DescriptorTable
    public let allocator: TableAllocator
    public let tlbs = TLBDomain()
    public let lock = MMULock()
    let retired = RetireList()
    /// A fresh hook for one walk's changes; `commit` acts on what it gathered.
    public var changeHook: ChangeHook { ChangeHook(tlbs: tlbs, retired: retired, logs: self) }

    /// Guarded by `lock`: read under shared, written under exclusive. The lock-guarded state below is
    /// exempt from Swift's per-access exclusivity check: the lock is the check, and faults read it.
    @exclusivity(unchecked) var slotTable: MemslotTable
    /// The VMM's own writes into logging slots (`writeGuest`), kept apart from what the guest's faults
    /// record and merged into every get: the same log the KVM backend keeps.
    public let vmmWrites = VMMWriteLog()
    /// Logging slots, by id. Guarded by `lock`.
    @exclusivity(unchecked) var dirtyLogs: [Int: SlotDirtyLog] = [:] { didSet { refreshDirtyTargets() } }
    /// Every vCPU's dirty ring.
    let rings = Mutex<[DirtyRing]>([])
    /// Nested guests and the rmaps of the L1 frames their shadow leaves map. `nestedLock` serializes
    /// shadow installs with invalidations (taken after `lock`).
    let nestedLock = NSLock()
    var shadows: [Int: ShadowMMU] = [:]
    var rmaps: [Int: NestedRmap] = [:]
    let hasNested = Atomic<Bool>(false)
    // MMU-notifier state: the sequence is read before a fault takes the lock and re-checked under it.
    private let invalidateSeq = Atomic<UInt64>(0)
    @exclusivity(unchecked) private var invalidatesInProgress = 0
    @exclusivity(unchecked) private var invalidateRange = HVARange(start: HVA(.max), end: HVA(0))

    /// Test hook run by the fault path between reading the invalidation sequence and taking the lock.
    @exclusivity(unchecked) public var faultWindowHook: (@Sendable () -> Void)?
    /// Test hook run by long walks between chunks, with the lock released.
    public var chunkBoundaryHook: (@Sendable () -> Void)?

    public init(ipaBits: Int = 48, maxSlots: Int = MemslotTable.defaultMaxSlots, allocator: TableAllocator = TableAllocator()) {
        self.ipaBits = ipaBits
        self.startLevel = Stage2Geometry.startLevel(ipaBits: ipaBits)
        self.allocator = allocator
        self.root = allocator.allocate()
        self.slotTable = MemslotTable(ipaBits: ipaBits, maxSlots: maxSlots)
    }

    deinit {
        lock.lockExclusive()
        _ = unmapLocked(GPARange(start: GPA(0), end: GPA(1 << UInt64(ipaBits))))
        allocator.free([root] + retired.takeSubtrees())
        lock.unlock()
    }

    // MARK: Memslots

    public var memslots: MemslotTable { lock.shared { slotTable } }

    /// Adds a slot. With `.dirtyLogging` in `flags` it logs from the start, with `logging` (by default
    /// write-protect), as KVM logs a slot created with KVM_MEM_LOG_DIRTY_PAGES.
    @discardableResult
    public func addSlot(id: Int, gpa: GPA, size: UInt64, memory: HostMemory, memoryOffset: UInt64 = 0,
                        flags: MemslotFlags = [], logging: DirtyLogConfig = DirtyLogConfig(strategy: .writeProtect))
        throws(DirtyLogError) -> Memslot {
        if flags.contains(.dirtyLogging) {
            if flags.contains(.readOnly) { throw .readOnlyAndLogging(id) }
            if let problem = logging.problem { throw problem }
        }
        lock.lockExclusive()
        defer { lock.unlock() }
        let slot: Memslot
        do {
            slot = try slotTable.add(id: id, gpa: gpa, size: size, memory: memory, memoryOffset: memoryOffset,
                                     flags: flags.subtracting(.dirtyLogging))
        } catch { throw .memory(error) }
        guard flags.contains(.dirtyLogging) else { return slot }
        try enableLocked(slot: id, logging)
        return slotTable.slot(id: id)!
    }

    /// Deletes a slot: its range is unmapped and flushed before this returns, so no vCPU can reach it,
    /// and the notifier sequence moves on, so a fault that began before cannot install from it.
    public func deleteSlot(id: Int) throws(GuestMemoryError) {
        lock.lockExclusive()
        defer { lock.unlock() }
        // Nested shadow leaves are found through the slot's rmap: clear them while the slot exists.
        if let s = slotTable.slot(id: id), hasNested.load(ordering: .acquiring) { invalidateNested(s.gpaRange) }
        let old = try slotTable.delete(id: id)
        dirtyLogs[id] = nil    // its dirty state goes with it
        vmmWrites.stop(slot: id)
        _ = unmapLocked(old.gpaRange)
        nestedLock.lock()
        rmaps[id] = nil
        nestedLock.unlock()
        invalidateSeq.add(1, ordering: .releasing)
    }

    /// Moves a slot to a new guest-physical base (KVM_MR_MOVE). A logging slot keeps logging, and
    /// keeps the pages it has not reported yet (page numbers count from the slot's start). The old range
    /// is unmapped while the slot still holds it, so dirty state the unmap takes is kept.
    public func moveSlot(id: Int, to gpa: GPA) throws(GuestMemoryError) {
        lock.lockExclusive()
        defer { lock.unlock() }
        guard let s = slotTable.slot(id: id) else { throw .noSuchSlot(id) }
        var moved = slotTable
        _ = try moved.move(id: id, to: gpa)    // validated before anything is unmapped
        if hasNested.load(ordering: .acquiring) { invalidateNested(s.gpaRange) }
        _ = unmapLocked(s.gpaRange)
        slotTable = moved
        dirtyLogs[id]?.slot = moved.slot(id: id)!
        refreshDirtyTargets()
        invalidateSeq.add(1, ordering: .releasing)
    }

    /// Sets a slot's flags. Making a slot read-only write-protects its mappings before returning.
    /// Turning `.dirtyLogging` on or off starts (with `logging`, by default write-protect) or stops
    /// logging; the slot's log, not its flag word, says whether it logs.
    public func setSlotFlags(id: Int, _ flags: MemslotFlags,
                             logging: DirtyLogConfig = DirtyLogConfig(strategy: .writeProtect)) throws(DirtyLogError) {
        guard let old = lock.shared({ slotTable.slot(id: id) }) else { throw .memory(.noSuchSlot(id)) }
        if flags.contains(.readOnly) && flags.contains(.dirtyLogging) { throw .readOnlyAndLogging(id) }
        // Writable first (a read-only slot cannot log), logging next, read-only last (a logging slot
        // cannot become read-only).
        if !flags.contains(.readOnly) && old.flags.contains(.readOnly) { try setReadOnly(id, false) }
        let logs = dirtyLog(slot: id) != nil
        if flags.contains(.dirtyLogging) && !logs {
            try enableDirtyLogging(slot: id, logging)
        } else if !flags.contains(.dirtyLogging) && logs {
            try disableDirtyLogging(slot: id)
        }
        if flags.contains(.readOnly) { try setReadOnly(id, true) }
    }

    /// Sets or clears a slot's read-only flag under the exclusive lock, leaving its logging flag as its
    /// log says (a racing enable or disable is never undone). Making it read-only write-protects its
    /// mappings before returning.
    private func setReadOnly(_ id: Int, _ readOnly: Bool) throws(DirtyLogError) {
        lock.lockExclusive()
        defer { lock.unlock() }
        guard let slot = slotTable.slot(id: id) else { throw .memory(.noSuchSlot(id)) }
        if readOnly && dirtyLogs[id] != nil { throw .loggingSlot(id) }
        let flags = readOnly ? slot.flags.union(.readOnly) : slot.flags.subtracting(.readOnly)
        do { _ = try slotTable.setFlags(id: id, flags) } catch { throw .memory(error) }
        if readOnly && !slot.flags.contains(.readOnly) {
            var v = ProtectVisitor(clear: Descriptor.write | Descriptor.dbm, changes: changeHook)
            _ = walk(slot.gpaRange, shared: false, &v)
            commit(v.changes)
        }
    }

    // MARK: Walks

    /// Runs a visitor over `range`. The caller holds `lock` (shared for a shared walk).
    @inlinable @discardableResult
    public func walk<V: Stage2Visitor>(_ range: GPARange, shared: Bool, _ visitor: inout V) -> Bool {
        // Past the IPA size the table indices would wrap around to low addresses.
        let r = range.clamped(to: GPARange(start: GPA(0), end: GPA(1 << UInt64(ipaBits))))
        return walkStage2(root: root, startLevel: startLevel, range: r, shared: shared, &visitor)
    }

    /// Points the vCPUs' dirty logs (SoftTLB.logDirty) at the DBM-logging slots as they are now.
    /// Under the exclusive lock, after any change of a log or of a logging slot's range.
    func refreshDirtyTargets() {
        let list = dirtyLogs.values.filter { $0.tracker.leavesRecord }.map { (range: $0.slot.gpaRange, bitmap: $0.bitmap) }
        _ = tlbs.setDirtyTargets(list.sorted { $0.range.start < $1.range.start })
    }

    /// Acts on what a walk's changes gathered: the range they touched leaves every vCPU TLB and nested
    /// shadow table (the dirty state they took is in the slot logs already). The caller holds `lock`.
    public func commit(_ changes: ChangeHook) {
        flush(changes.touched)
    }

    /// Shoots down a touched range from every vCPU TLB, and from nested guests' shadow tables built on
    /// it (shadow leaves are cached translations of L1 memory too).
    public func flush(_ touched: TouchedRange) {
        guard let r = touched.range else { return }
        tlbs.shootdown(r)
        if hasNested.load(ordering: .acquiring) { invalidateNested(r) }
    }

    /// Frees retired tables. Only under the exclusive lock, after a shootdown.
    func reclaim() {
        allocator.free(retired.takeSubtrees())
    }

    /// Maps `range` to host memory starting at `output` with leaves of `size` (exclusive).
    public func map(_ range: GPARange, to output: HVA, size: PageSize, permissions: Permissions,
                    cache: inout TableCache) {
        precondition(range.start.isAligned(to: size.bytes) && range.size % size.bytes == 0 && output.isAligned(to: size.bytes),
                     "map: range and output must be aligned to the leaf size")
        precondition(range.end.raw <= 1 << UInt64(ipaBits), "map: range \(range) beyond the \(ipaBits)-bit IPA space")
        lock.lockExclusive()
        defer { lock.unlock() }
        var v = MapVisitor(start: range.start, output: output, size: size,
                           attributes: permissions.rawValue | Descriptor.accessFlag, changes: changeHook, cache: cache)
        _ = walk(range, shared: false, &v)
        cache = v.cache
        commit(v.changes)
        reclaim()
    }

    /// Unmaps `range` (whole blocks where a block overlaps it), frees empty tables, flushes TLBs.
    @discardableResult
    public func unmap(_ range: GPARange) -> Int {
        lock.lockExclusive()
        defer { lock.unlock() }
        return unmapLocked(range)
    }

    func unmapLocked(_ range: GPARange) -> Int {
        var v = UnmapVisitor(changes: changeHook)
        _ = walk(range, shared: false, &v)
        commit(v.changes)
        reclaim()
        return v.leavesCleared
    }

    /// Records in its slot's dirty log a DBM-dirty page a change took away (an unmap, a replacement).
    /// The caller holds `lock`; a page of no logging slot has nobody to tell.
    func keepDirty(_ gpa: GPA) {
        guard let slot = slotTable.lookup(gpa), let log = dirtyLogs[slot.id] else { return }
        log.bitmap.set((gpa - slot.gpaRange.start) >> 12)
    }

    /// Sets and clears attribute bits on every leaf in `range`, flushing TLBs if anything was removed.
    /// `shared` runs it concurrently with faults (compare-and-swap updates).
    @discardableResult
    public func protect(_ range: GPARange, set: UInt64 = 0, clear: UInt64 = 0, shared: Bool = false) -> Int {
        shared ? lock.lockShared() : lock.lockExclusive()
        defer { lock.unlock() }
        var v = ProtectVisitor(set: set, clear: clear, changes: changeHook)
        _ = walk(range, shared: shared, &v)
        commit(v.changes)
        return v.leavesChanged
    }

    /// Splits every block in `range` down to `size` leaves.
    @discardableResult
    public func split(_ range: GPARange, to size: PageSize, cache: inout TableCache, shared: Bool = false) -> Int {
        shared ? lock.lockShared() : lock.lockExclusive()
        defer { lock.unlock() }
        var v = SplitVisitor(range, to: size, changes: changeHook, cache: cache)
        _ = walk(range, shared: shared, &v)
        cache = v.cache
        commit(v.changes)
        return v.blocksSplit
    }

    /// Collapses full, contiguous tables in `range` back to blocks of at most `maxSize`.
    @discardableResult
    public func collapse(_ range: GPARange, maxSize: PageSize = .size1G) -> Int {
        lock.lockExclusive()
        defer { lock.unlock() }
        // Logging slots keep their small leaves: a block would hide per-page dirty state.
        if dirtyLogs.values.contains(where: { $0.slot.gpaRange.overlaps(range) }) { return 0 }
        var v = CollapseVisitor(range: range, maxSize: maxSize, changes: changeHook)
        _ = walk(range, shared: false, &v)
        commit(v.changes)
        reclaim()
        return v.collapsed
    }

    /// Test-and-clear of the access flag over `range`; returns how many leaves were young.
    public func testAndClearYoung(_ range: GPARange) -> Int {
        lock.lockShared()
        defer { lock.unlock() }
        var v = AccessFlagVisitor(changes: changeHook)
        _ = walk(range, shared: true, &v)
        commit(v.changes)
        return v.young
    }

    /// The leaf mapping `gpa`, found by the software walker.
    public func leaf(at gpa: GPA) -> (descriptor: Descriptor, size: PageSize)? {
        lock.lockShared()
        defer { lock.unlock() }
        var v = LeafLookupVisitor()
        _ = walk(GPARange(start: gpa, size: 1), shared: true, &v)
        guard let d = v.leaf, let s = PageSize(level: v.level) else { return nil }
        return (d, s)
    }

    /// Tables and leaves per level over the whole IPA space.
    public func census() -> CensusVisitor {
        lock.lockShared()
        defer { lock.unlock() }
        var v = CensusVisitor()
        _ = walk(GPARange(start: GPA(0), end: GPA(1 << UInt64(ipaBits))), shared: true, &v)
        return v
    }

    // MARK: The vCPU's hardware walk

    /// The table walk a vCPU's MMU performs on a TLB miss: a lock-free descent that reads each level
    /// once. It is not a software operation on the table, so it is not a walker visitor; tables it
    /// may be reading are freed only after every vCPU has passed a safe point.
    @inlinable @inline(__always)
    public func translate(_ gpa: GPA) -> Translation? {
        hardwareWalk(root: root, startLevel: startLevel, ipaBits: ipaBits, gpa)
    }

    // MARK: Fault path

    /// Resolves a stage-2 fault at `gpa` (KVM's user_mem_abort for the soft backend). The caller is
    /// outside guest mode; `cache` is its per-vCPU table reserve, topped up here before the lock;
    /// `ring` is its dirty ring, used when the slot logs with the ring strategy.
    public func handleFault(_ gpa: GPA, _ access: AccessKind, cache: inout TableCache, ring: DirtyRing? = nil) -> FaultOutcome {
        let seq = invalidateSeq.load(ordering: .acquiring)
        cache.topUp(to: 5 - startLevel)
        faultWindowHook?()
        lock.lockShared()
        defer { lock.unlock() }

        guard let slot = slotTable.lookup(gpa) else { return .mmio(gpa, access) }
        if access == .write && slot.flags.contains(.readOnly) { return .readOnlyWrite(gpa, slot: slot.id) }
        let log = slot.flags.contains(.dirtyLogging) ? dirtyLogs[slot.id] : nil
        let permissions: Permissions = slot.flags.contains(.readOnly) ? [.read, .execute] : .all
        if let t = translate(gpa) {
            // Permission fault, or a spurious one: another vCPU already fixed the leaf.
            if t.leaf.permissions.contains(access.required) { return .retry }
            if let log, access == .write { return loggedWrite(gpa, t, log, &cache, ring) }
            // The slot grants more than the leaf has (made writable again, or logging stopped):
            // relax in place.
            guard permissions.contains(access.required) else { return .permission(gpa, access, t.leaf) }
            // While logging, write permission comes back only through loggedWrite, which records it.
            let grant = log == nil ? permissions : permissions.subtracting(.write)
            let relaxed = t.leaf.setting(grant.rawValue)
            _ = ChangeHook.grant(t.context(gpa), log == nil ? relaxed.clearing(Descriptor.swLogged) : relaxed)
            return .retry
        }

        let tracker = log?.tracker ?? NotLogging()
        let size = Self.mappingSize(for: gpa, in: slot, tracker: tracker)
        let blockStart = gpa.alignedDown(to: size.bytes)
        // An invalidation of any host page the new leaf would map began or completed since we
        // started: our view may be stale.
        let hvaRange = HVARange(start: slot.hva(for: blockStart), size: size.bytes)
        if invalidatesInProgress > 0 && invalidateRange.overlaps(hvaRange) { return .retry }
        if invalidateSeq.load(ordering: .acquiring) != seq { return .retry }

        if access == .write && tracker.usesRings, let ring, ring.isSoftFull { return .dirtyRingFull }
        let (attributes, recordAfter) = tracker.faultLeaf(permissions.rawValue | Descriptor.accessFlag,
                                                          write: access == .write, size: size)
        var v = MapVisitor(start: blockStart, output: slot.hva(for: blockStart), size: size,
                           attributes: attributes, changes: changeHook, cache: cache)
        walk(GPARange(start: blockStart, size: size.bytes), shared: true, &v)
        cache = v.cache
        commit(v.changes)
        if recordAfter, let log { record(GPARange(start: blockStart, size: size.bytes), log, ring) }
        return .mapped(size)
    }

    /// A guest write to a leaf that dirty logging protects. A block is split if the tracker says so (the
    /// written page then faults on its own 4 KiB leaf), else marked and unprotected whole. A 4 KiB page
    /// is marked, then made writable.
    @inline(__always)
    private func loggedWrite(_ gpa: GPA, _ t: Translation, _ log: SlotDirtyLog, _ cache: inout TableCache,
                             _ ring: DirtyRing?) -> FaultOutcome {
        let size = Stage2Geometry.entrySize(t.level)
        let range = GPARange(start: gpa.alignedDown(to: size), size: size)
        if t.level < 3, let split = log.splitOnWrite {
            // Only the path to the written page goes down to 4 KiB; the rest stays in protected blocks.
            var v = SplitVisitor(GPARange(start: gpa.alignedDown(to: PageSize.bytes4K), size: PageSize.bytes4K), to: .size4K,
                                 changes: changeHook, cache: cache, leafSet: split.set, leafClear: split.clear)
            walk(range, shared: true, &v)
            cache = v.cache
            commit(v.changes)
            return .retry
        }
        if log.usesRings, let ring, ring.isSoftFull { return .dirtyRingFull }
        // Writable first, then recorded (as KVM's fast page fault): the guest's write comes after
        // both, and a harvest that takes the record before the leaf turns writable would otherwise
        // re-protect nothing and lose every later write. A DBM leaf is recorded by its own W bit.
        guard ChangeHook.grant(t.context(gpa), t.leaf.setting(Descriptor.write).clearing(Descriptor.swLogged)) else { return .retry }
        if !t.leaf.has(Descriptor.dbm) { record(range, log, ring) }
        return .retry
    }

    /// Marks a range of a logging slot dirty: in the faulting vCPU's ring if the tracker uses rings,
    /// else in the slot bitmap.
    @inline(__always)
    private func record(_ range: GPARange, _ log: SlotDirtyLog, _ ring: DirtyRing?) {
        let first = (range.start - log.slot.gpaRange.start) >> 12
        if log.usesRings, let ring {
            for p in first..<(first + (range.size >> 12)) { ring.push(DirtyRingEntry(slot: log.slot.id, page: p)) }
        } else {
            log.bitmap.set(first: first, count: range.size >> 12)
        }
    }

    /// The largest leaf that may map `gpa`: no larger than the host backing's page, wholly inside the
    /// slot, and with guest and host addresses congruent modulo the size (else a block would map the
    /// wrong host pages: seed 003's force_pte). A logging slot's tracker may ask for less (most map
    /// 4 KiB leaves; block-granular keeps blocks).
    public static func mappingSize(for gpa: GPA, in slot: Memslot, logging: DirtyStrategy? = nil) -> PageSize {
        mappingSize(for: gpa, in: slot, tracker: logging?.tracker ?? NotLogging())
    }

    static func mappingSize(for gpa: GPA, in slot: Memslot, tracker: any DirtyTracker) -> PageSize {
        tracker.mappingSize(hostFit(for: gpa, in: slot))
    }

    /// The largest leaf the backing and the slot's placement allow at `gpa`.
    static func hostFit(for gpa: GPA, in slot: Memslot) -> PageSize {
        var size = slot.backing.hostPageSize
        while size > .size4K {
            let start = gpa.alignedDown(to: size.bytes)
            let fits = start >= slot.gpaRange.start && start + size.bytes <= slot.gpaRange.end
            let congruent = (slot.hvaStart.raw &- slot.gpaRange.start.raw) & (size.bytes - 1) == 0
            if fits && congruent { return size }
            size = PageSize(rawValue: size.rawValue - 1)!
        }
        return .size4K
    }

    // MARK: MMU notifier

    /// Host memory in `range` is about to change: unmap every guest mapping of it and make racing
    /// faults retry until `invalidateRangeEnd`.
    public func invalidateRangeStart(_ range: HVARange) {
        lock.lockExclusive()
        defer { lock.unlock() }
        invalidatesInProgress += 1
        invalidateRange = invalidatesInProgress == 1 ? range
            : HVARange(start: min(invalidateRange.start, range.start), end: max(invalidateRange.end, range.end))
        var v = UnmapVisitor(changes: changeHook)
        for (_, gpaRange) in slotTable.slots(overlapping: range) { _ = walk(gpaRange, shared: false, &v) }
        commit(v.changes)
        reclaim()
    }

    public func invalidateRangeEnd(_ range: HVARange) {
        lock.lockExclusive()
        defer { lock.unlock() }
        invalidateSeq.add(1, ordering: .releasing)
        invalidatesInProgress -= 1
        if invalidatesInProgress == 0 { invalidateRange = HVARange(start: HVA(.max), end: HVA(0)) }
    }

    /// The notifier's sequence count (completed invalidations).
    public var invalidationSequence: UInt64 { invalidateSeq.load(ordering: .acquiring) }

    /// Discards the host pages behind part of a slot (MADV_DONTNEED, or hole punching for memfd),
    /// wrapped in an invalidation so no vCPU keeps a mapping of the old pages.
    public func discard(slot id: Int, offset: UInt64, length: UInt64) throws(GuestMemoryError) {
        let (slot, memory) = lock.shared { (slotTable.slot(id: id), slotTable.memory(forSlot: id)) }
        guard let slot, let memory else { throw .noSuchSlot(id) }
        guard offset % PageSize.bytes4K == 0 else { throw .unalignedSize(offset, alignment: PageSize.bytes4K) }
        guard length % PageSize.bytes4K == 0, length > 0 else { throw .unalignedSize(length, alignment: PageSize.bytes4K) }
        guard offset + length <= slot.size else { throw .backingTooSmall(slotSize: offset + length, backingSize: slot.size) }
        let range = HVARange(start: slot.hvaStart + offset, size: length)
        invalidateRangeStart(range)
        defer { invalidateRangeEnd(range) }
        try memory.discard(offset: slot.hvaStart - memory.base + offset, length: length)
    }
}
