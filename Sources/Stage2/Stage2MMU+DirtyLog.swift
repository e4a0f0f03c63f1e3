import DirtyLog
import GuestMemory

/// Dirty logging: the same API for every strategy (and, later, for the KVM backend).
extension Stage2MMU {
    /// Pages a long walk handles per hold of the exclusive lock (64 MiB): a fault waits for one chunk,
    /// never for a whole slot. A multiple of 512, so chunks keep 2 MiB blocks whole.
    public static let lockChunkPages: UInt64 = 16_384

    /// Runs `body` over `log`'s slot a chunk at a time (its GPA range and pages), each under the
    /// exclusive lock, letting faults in between; the chunks' changes go through one hook, committed
    /// (flushed) once at the end, before this returns: a write let in between through a translation
    /// not flushed yet is one that completes before the operation returns. Throws if the slot stops
    /// logging meanwhile.
    func forEachChunk(of log: SlotDirtyLog, id: Int, pages: Range<UInt64>? = nil, changes: ChangeHook,
                      _ body: (GPARange, Range<UInt64>, inout ChangeHook) -> Void) throws(DirtyLogError) {
        var changes = changes
        var page = pages?.lowerBound ?? 0
        while true {
            lock.lockExclusive()
            let slot = log.slot    // as it is now: a move between chunks is followed
            let end = min(pages?.upperBound ?? slot.pageCount, slot.pageCount)
            let logging = dirtyLogs[id] === log
            guard logging, page < end else {
                commit(changes)
                lock.unlock()
                // Read under the lock: a slot change on another thread rewrites the table.
                if !logging { throw .notLogging(slot: id) }
                return
            }
            let next = min(end, (page / Self.lockChunkPages + 1) * Self.lockChunkPages)
            body(GPARange(start: slot.gpaRange.start + (page << 12), size: (next - page) << 12), page..<next, &changes)
            lock.unlock()
            page = next
            chunkBoundaryHook?()
        }
    }

    /// Starts dirty logging on a slot while vCPUs may be running. Unless initially-all-set, every leaf
    /// is protected (or, for DBM, made writable-clean) and flushed before this returns, so every later
    /// write is seen; eager split first splits every block, from a pre-filled table cache. The slot
    /// logs from the first chunk on: a fault meanwhile already records.
    public func enableDirtyLogging(slot id: Int, _ config: DirtyLogConfig) throws(DirtyLogError) {
        if let problem = config.problem { throw problem }
        lock.lockExclusive()
        let log: SlotDirtyLog
        do { log = try enableLocked(slot: id, config) } catch { lock.unlock(); throw error }
        lock.unlock()
        if config.initiallySet { return }
        try forEachChunk(of: log, id: id, changes: changeHook) { range, _, changes in
            if log.tracker.splitsAhead { log.splitTablesUsed += eagerSplit(range) }
            var v = LogProtectVisitor(tracker: log.tracker, changes: changes)
            _ = walk(range, shared: false, &v)
            changes = v.changes
        }
    }

    /// Installs a slot's log under the exclusive lock (also for a slot added with the logging flag,
    /// which has no mappings to protect yet). Initially-all-set reports every page at once.
    @discardableResult
    func enableLocked(slot id: Int, _ config: DirtyLogConfig) throws(DirtyLogError) -> SlotDirtyLog {
        guard let slot = slotTable.slot(id: id) else { throw .memory(.noSuchSlot(id)) }
        guard !slot.flags.contains(.readOnly) else { throw .readOnlySlot(id) }
        guard dirtyLogs[id] == nil else { throw .alreadyLogging(slot: id) }
        do { _ = try slotTable.setFlags(id: id, slot.flags.union(.dirtyLogging)) } catch { throw .memory(error) }
        let log = SlotDirtyLog(slot: slotTable.slot(id: id)!, config: config)
        dirtyLogs[id] = log
        vmmWrites.start(slot: id, pages: slot.pageCount)
        if config.initiallySet { log.bitmap.set(first: 0, count: slot.pageCount) }
        return log
    }

    /// Stops dirty logging. Where the backing allows blocks, the slot's small leaves are dropped so
    /// later faults map blocks again; otherwise leaves just get their write permission back.
    public func disableDirtyLogging(slot id: Int) throws(DirtyLogError) {
        lock.lockExclusive()
        defer { lock.unlock() }
        guard let log = dirtyLogs[id], let slot = slotTable.slot(id: id) else { throw .notLogging(slot: id) }
        dirtyLogs[id] = nil
        vmmWrites.stop(slot: id)
        do { _ = try slotTable.setFlags(id: id, slot.flags.subtracting(.dirtyLogging)) } catch { throw .memory(error) }
        if slot.backing.hostPageSize > .size4K {
            _ = unmapLocked(log.slot.gpaRange)
        } else {
            // Logging is over: whatever dirty state the leaves still hold is not wanted any more.
            var changes = changeHook
            changes.forgetDirty()
            var v = ProtectVisitor(set: Descriptor.write, clear: Descriptor.swLogged | Descriptor.dbm, changes: changes)
            _ = walk(log.slot.gpaRange, shared: false, &v)
            commit(v.changes)
        }
    }

    /// The log of a slot, if it is logging.
    public func dirtyLog(slot id: Int) -> SlotDirtyLog? { lock.shared { dirtyLogs[id] } }

    /// The pages of `slot` dirtied since the last call (bit i of word w = page 64w + i). Without manual
    /// protect, the reported pages are re-protected and flushed before this returns
    /// (KVM_GET_DIRTY_LOG); with it, nothing is re-protected and nothing forgotten: a page is reported
    /// by every get until clearDirtyLog names it (KVM's manual protect).
    /// vCPUs keep running; their faults wait for one chunk at a time while pages are re-protected,
    /// and DBM vCPUs go on logging their writes beside it, in their own buffers.
    public func getDirtyLog(slot id: Int) throws(DirtyLogError) -> [UInt64] {
        guard let log = dirtyLog(slot: id) else { throw .notLogging(slot: id) }
        if log.tracker.usesRings { drainDirtyRings() }
        var out = [UInt64](repeating: 0, count: log.bitmap.wordCount)
        let manual = log.config.manualProtect
        // DBM vCPUs log writes in their own buffers (SoftTLB.logDirty) and publish them when full, at
        // safe points with a flush and on leaving guest mode. A shootdown of every TLB first has each
        // publish now (as KVM flushes PML buffers before a get): nothing would be lost without it, a
        // page logged and not yet published is reported by a later get, but this one is complete.
        if log.tracker.leavesRecord { tlbs.shootdown(GPARange(start: GPA(0), end: GPA(1 << 52))) }
        // What the bitmap holds now is reported by this get; a page marked from here on is in it or
        // in a later one. (Without manual protect the harvest forgets it; each chunk then re-protects
        // its reported pages, and a write to one before its chunk is done is in the copy the caller
        // takes afterwards.)
        if manual { log.bitmap.copy(into: &out) } else { log.bitmap.harvest(into: &out) }
        vmmWrites.report(slot: id, keep: manual, into: &out)
        try out.withUnsafeMutableBufferPointer { (words) throws(DirtyLogError) in
            var changes = changeHook
            if !manual { changes.forgetDirty() }    // reported now (what a DBM walk takes goes to `out` first)
            try forEachChunk(of: log, id: id, changes: changes) { range, pages, changes in
                if log.tracker.leavesRecord {
                    var v = DBMHarvestVisitor(slotStart: log.slot.gpaRange.start, bitmap: words, clean: !manual, changes: changes)
                    _ = walk(range, shared: false, &v)
                    changes = v.changes
                }
                if !manual { protectPages(UnsafeBufferPointer(words), pages: pages, of: log, shared: false, changes: &changes) }
            }
        }
        return out
    }

    /// Forgets and re-protects exactly the pages named by `bitmap`, whose bit 0 is page `firstPage` of
    /// the slot (KVM_CLEAR_DIRTY_LOG): their bits go first, then their write permission, so a write
    /// after the clear faults and is reported again. Eager split splits the blocks over those pages
    /// first. A chunk at a time.
    public func clearDirtyLog(slot id: Int, firstPage: UInt64, bitmap: [UInt64]) throws(DirtyLogError) {
        guard firstPage % 64 == 0 else { throw .unalignedClear(firstPage: firstPage) }
        guard let log = dirtyLog(slot: id) else { throw .notLogging(slot: id) }
        let pages = UInt64(bitmap.count) * 64
        let last = bitmap.lastIndex { $0 != 0 }.map { UInt64($0) * 64 + 64 - UInt64(bitmap[$0].leadingZeroBitCount) } ?? 0
        guard firstPage <= log.slot.pageCount, last <= log.slot.pageCount - firstPage else {   // without overflow
            throw .clearOutOfRange(slot: id, firstPage: firstPage, pages: pages, slotPages: log.slot.pageCount)
        }
        log.bitmap.clear(bitmap: bitmap, firstPage: firstPage)
        vmmWrites.forget(slot: id, bitmap: bitmap, firstPage: firstPage)
        // Shift the caller's words to slot page numbers once; chunks then index them directly.
        var words = [UInt64](repeating: 0, count: log.bitmap.wordCount)
        for (i, w) in bitmap.enumerated() where Int(firstPage >> 6) + i < words.count { words[Int(firstPage >> 6) + i] = w }
        try words.withUnsafeBufferPointer { (w) throws(DirtyLogError) in
            var changes = changeHook
            changes.forgetDirty()    // the caller has these pages
            try forEachChunk(of: log, id: id, pages: firstPage..<(firstPage + last), changes: changes) { _, pages, changes in
                protectPages(w, pages: pages, of: log, shared: false, changes: &changes)
            }
        }
    }

    /// Re-protects the runs of set bits of `bitmap` (bit i = page i of the slot) among `pages`. The
    /// caller holds the lock (shared for a shared walk).
    private func protectPages(_ bitmap: UnsafeBufferPointer<UInt64>, pages: Range<UInt64>, of log: SlotDirtyLog,
                              shared: Bool, changes: inout ChangeHook) {
        let base = log.slot.gpaRange.start
        var cache = log.tracker.splitsAhead ? TableCache(allocator: allocator) : nil
        forEachRun(bitmap, pages: pages) { start, count in
            let range = GPARange(start: base + (start << 12), size: count << 12)
            if cache != nil {
                // Split the blocks over this run first, so no vCPU splits inside a write fault.
                let blocks = GPARange(start: range.start.alignedDown(to: PageSize.bytes2M),
                                      end: GPA((range.end.raw + PageSize.bytes2M - 1) & ~(PageSize.bytes2M - 1)))
                let chunk = blocks.clamped(to: log.slot.gpaRange)
                var s = SplitVisitor(chunk, to: .size4K, changes: changes, cache: cache!)
                _ = walk(chunk, shared: shared, &s)
                cache = s.cache
                changes = s.changes
            }
            var v = LogProtectVisitor(tracker: log.tracker, changes: changes)
            _ = walk(range, shared: shared, &v)
            changes = v.changes
            // A DBM page a vCPU logged in its own buffer kept a clean leaf, and W in that vCPU's TLB
            // only: forgetting the page must take W from every TLB, or later writes go unlogged.
            if log.tracker.leavesRecord { changes.touched.add(range) }
        }
        if var c = cache {
            log.splitTablesUsed += c.used
            c.drain()
        }
    }

    /// Splits every block in `range` to 4 KiB leaves from a cache pre-filled with exactly the tables
    /// the split needs (counted first). Caller holds the lock exclusively. Returns the tables used.
    private func eagerSplit(_ range: GPARange) -> Int {
        var census = CensusVisitor()
        _ = walk(range, shared: false, &census)
        let needed = census.leaves[2] + census.leaves[1] * (1 + 512)
        guard needed > 0 else { return 0 }
        var cache = TableCache(allocator: allocator)
        cache.topUp(to: needed)
        var v = SplitVisitor(range, to: .size4K, changes: changeHook, cache: cache)
        _ = walk(range, shared: false, &v)
        cache = v.cache
        commit(v.changes)
        let used = cache.used
        cache.drain()
        return used
    }

    // MARK: Dirty rings

    public func register(_ ring: DirtyRing) { rings.withLock { $0.append(ring) } }
    public func unregister(_ ring: DirtyRing) { rings.withLock { $0.removeAll { $0 === ring } } }

    /// Collects the entries pushed since the last harvest from every vCPU's ring.
    public func harvestDirtyRings() -> [DirtyRingEntry] {
        var out: [DirtyRingEntry] = []
        harvestDirtyRings(into: &out)
        return out
    }

    /// Appends the entries pushed since the last harvest to `out`; returns how many. Pages of
    /// ring-logged slots kept elsewhere come along too (the VMM's own writes, and ring entries a
    /// ring-full exit drained into the slot bitmap), as KVM's ring-with-bitmap; they need no
    /// re-protecting.
    @discardableResult
    public func harvestDirtyRings(into out: inout [DirtyRingEntry]) -> Int {
        var n = rings.withLock { $0 }.reduce(0) { $0 + $1.harvest(into: &out) }
        let logs = lock.shared { dirtyLogs.values.filter { $0.tracker.usesRings } }
        for log in logs {
            var words: [UInt64] = []
            log.bitmap.harvest(into: &words)
            vmmWrites.report(slot: log.slot.id, keep: false, into: &words)
            forEachSetBit(words) { out.append(DirtyRingEntry(slot: log.slot.id, page: $0)); n += 1 }
        }
        return n
    }

    /// Re-protects every harvested ring entry's page, flushes, then frees their room in the rings
    /// (KVM_RESET_DIRTY_RINGS). Returns how many entries were reset.
    @discardableResult
    public func resetDirtyRings() -> Int {
        let all = rings.withLock { $0 }
        lock.lockShared()
        // Gather the entries per slot into a bitmap, so each run of pages is one walk.
        // (Slot id and size copied out: the loop per entry touches no reference.)
        var bitmaps: [(id: Int, pages: UInt64, log: SlotDirtyLog, words: [UInt64])] = []
        var current = -1
        var ends: [Int] = []
        for ring in all {
            ends.append(ring.forEachHarvested { e in
                if current < 0 || bitmaps[current].id != e.slot {
                    if let i = bitmaps.firstIndex(where: { $0.id == e.slot }) {
                        current = i
                    } else {
                        // A slot that logs with another strategy now (deleted and added again, or
                        // logging stopped and restarted) keeps its dirty state elsewhere: DBM's is the
                        // leaves' W bits, which a re-protect here would forget.
                        guard let log = dirtyLogs[e.slot], log.usesRings else { return }
                        bitmaps.append((e.slot, log.slot.pageCount, log, [UInt64](repeating: 0, count: log.bitmap.wordCount)))
                        current = bitmaps.count - 1
                    }
                }
                // An entry of a slot deleted meanwhile may not fit the slot now holding its id: drop
                // it (KVM's reset does the same).
                guard e.page < bitmaps[current].pages else { return }
                bitmaps[current].words[Int(e.page >> 6)] |= 1 << (e.page & 63)
            })
        }
        var changes = changeHook
        changes.forgetDirty()    // harvested
        for (_, _, log, words) in bitmaps {
            words.withUnsafeBufferPointer { protectPages($0, pages: 0..<log.slot.pageCount, of: log, shared: true, changes: &changes) }
        }
        commit(changes)
        lock.unlock()
        return zip(all, ends).reduce(0) { $0 + $1.0.reset(upTo: $1.1) }
    }

    /// Moves every ring entry into its slot's bitmap and resets the rings: what getDirtyLog does under
    /// the ring strategy, and what a VMM does when a vCPU exits on a full ring. Entries of slots
    /// deleted, no longer logging, or logging with another strategy are dropped.
    public func drainDirtyRings() {
        var entries: [DirtyRingEntry] = []
        for ring in rings.withLock({ $0 }) { _ = ring.harvest(into: &entries) }
        lock.shared {
            for e in entries {
                if let log = dirtyLogs[e.slot], log.usesRings, log.slot.contains(page: e.page) { log.bitmap.set(e.page) }
            }
        }
        resetDirtyRings()
    }

    // MARK: The VMM's own accesses

    /// Copies `bytes` into guest memory at `gpa` as the VMM (device emulation, a loader). The write is
    /// recorded in the slot's dirty log after it lands, so a harvest that sees the bit sees the data.
    public func writeGuest(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(DirtyLogError) {
        lock.lockShared()
        defer { lock.unlock() }
        guard let slot = slotTable.lookup(gpa), gpa.raw + UInt64(bytes.count) <= slot.gpaRange.end.raw else {
            throw .outsideGuestMemory(gpa, length: bytes.count)
        }
        guard !slot.flags.contains(.readOnly) else { throw .vmmWriteToReadOnly(slot.id) }
        guard !bytes.isEmpty else { return }
        slot.hva(for: gpa).pointer.copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
        vmmWrites.record(slot: slot.id, offset: gpa - slot.gpaRange.start, length: UInt64(bytes.count))
    }

    /// Copies guest memory at `gpa` out, as the VMM.
    public func readGuest(_ gpa: GPA, into buffer: UnsafeMutableRawBufferPointer) throws(DirtyLogError) {
        lock.lockShared()
        defer { lock.unlock() }
        guard let slot = slotTable.lookup(gpa), gpa.raw + UInt64(buffer.count) <= slot.gpaRange.end.raw else {
            throw .outsideGuestMemory(gpa, length: buffer.count)
        }
        buffer.baseAddress!.copyMemory(from: slot.hva(for: gpa).pointer, byteCount: buffer.count)
    }
}
