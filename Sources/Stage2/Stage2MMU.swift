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
    let invalidateSeq = Atomic<UInt64>(0)
    @exclusivity(unchecked) var invalidatesInProgress = 0
    @exclusivity(unchecked) var invalidateRange = HVARange(start: HVA(.max), end: HVA(0))

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
}
