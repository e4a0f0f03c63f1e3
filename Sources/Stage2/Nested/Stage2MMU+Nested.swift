import GuestMemory

/// Nested guests: L0's side.
extension Stage2MMU {
    /// Creates nested guest `lpid` (1...4095) whose memory L1 describes with the table at `l1Table`.
    public func createNestedGuest(lpid: Int, l1Table: GPA) throws(NestedError) -> ShadowMMU {
        guard (1..<4096).contains(lpid) else { throw .badLPID(lpid) }
        guard l1Table.isAligned(to: PageSize.bytes4K), lock.shared({ slotTable.lookup(l1Table) }) != nil else {
            throw .tableOutsideL1(l1Table)
        }
        nestedLock.lock()
        defer { nestedLock.unlock() }
        guard shadows[lpid] == nil else { throw .lpidInUse(lpid) }
        let s = ShadowMMU(lpid: lpid, l1Table: l1Table, l0: self)
        shadows[lpid] = s
        hasNested.store(true, ordering: .releasing)
        return s
    }

    /// The rmap of a slot, created on first use. Caller holds `nestedLock`.
    func rmap(forSlot slot: Memslot) -> NestedRmap {
        if let r = rmaps[slot.id] { return r }
        let r = NestedRmap(pages: slot.pageCount)
        rmaps[slot.id] = r
        return r
    }

    /// The rmap of a slot, if nested leaves ever mapped it.
    public func nestedRmap(slot id: Int) -> NestedRmap? {
        nestedLock.lock()
        defer { nestedLock.unlock() }
        return rmaps[id]
    }

    /// L1 memory in `range` lost a mapping or a permission at L0: clear every shadow leaf built on
    /// it, found through the rmap of each frame (a leaf is cleared only if it still maps the same
    /// host page), and flush the L2 vCPUs' TLBs. Returns the rmap entries handled.
    @discardableResult
    public func invalidateNested(_ range: GPARange) -> Int {
        nestedLock.lock()
        defer { nestedLock.unlock() }
        var handled = 0
        var touched: [Int: TouchedRange] = [:]
        for slot in slotTable.slots where slot.gpaRange.overlaps(range) {
            guard let rmap = rmaps[slot.id] else { continue }
            let r = range.clamped(to: slot.gpaRange)
            let first = (r.start - slot.gpaRange.start) >> 12
            let end = (r.end.raw - slot.gpaRange.start.raw + 4095) >> 12
            // Block leaves are noted at their first frame, which may lie before the range.
            var earlier: [UInt64] = []
            for block in [PageSize.size2M, .size1G] {
                let f = first & ~(block.pages4K - 1)
                if f < first && !earlier.contains(f) { earlier.append(f) }
            }
            func clear(_ e: RmapEntry, _ f: UInt64) {
                handled += 1
                guard let shadow = shadows[e.lpid] else { return }
                if let cleared = shadow.clear(l2: e.l2GFN, size: e.size, host: slot.hva(for: slot.gpaRange.start + (f << 12))) {
                    touched[e.lpid, default: TouchedRange()].add(cleared)
                }
            }
            for f in earlier {
                for e in rmap.entries(frame: f) where f + e.size.pages4K > first {
                    rmap.remove(e, frame: f)
                    clear(e, f)
                }
            }
            // Every entry of a frame inside the range goes: one lock round per frame.
            for f in first..<end { for e in rmap.takeAll(frame: f) { clear(e, f) } }
        }
        for (lpid, t) in touched { if let r = t.range { shadows[lpid]?.tlbs.shootdown(r) } }
        return handled
    }
}

public enum NestedError: Error, Equatable, CustomStringConvertible {
    case badLPID(Int)
    case lpidInUse(Int)
    case tableOutsideL1(GPA)
    public var description: String {
        switch self {
        case let .badLPID(l): return "LPID \(l) is outside 1...4095 (0 is the host's)"
        case let .lpidInUse(l): return "LPID \(l) already names a nested guest"
        case let .tableOutsideL1(g): return "the nested guest's table at \(g) is not page-aligned L1 memory"
        }
    }
}
