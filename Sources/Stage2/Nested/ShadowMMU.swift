import Foundation
import GuestMemory
import Synchronization

/// How a nested (L2) fault was resolved.
public enum NestedFaultOutcome: Equatable, Sendable, CustomStringConvertible {
    /// A shadow leaf of this size now maps the address: retry the access.
    case mapped(PageSize)
    /// Raced an invalidation: retry.
    case retry
    /// L1's table does not map the address (or not with this permission): the fault goes to L1.
    case reflect(GPA, AccessKind)
    /// The L1 address behind it is not plain L1 RAM (MMIO, a read-only slot): an exit at L0.
    case l1(FaultOutcome)

    public var description: String {
        switch self {
        case let .mapped(s): return "mapped \(s)"
        case .retry: return "retry"
        case let .reflect(g, a): return "reflected to L1: \(a) at L2 \(g)"
        case let .l1(o): return "L1 address: \(o)"
        }
    }
}

/// The shadow stage-2 table of one nested guest (L2): L2 GPA -> host, built lazily from L1's own
/// table for L2 (in L1 memory, same descriptor format, outputs are L1 GPAs) and L0's stage-2 for L1.
/// Shadow leaves are like TLB entries of the two combined: whatever removes an L1 mapping or
/// permission at L0 removes the shadow leaves built on it, found through the rmap.
public final class ShadowMMU: Sendable {
    public let lpid: Int
    /// L1's table for this guest: the GPA (in L1 memory) of its level-0 table (48-bit L2 IPA).
    public let l1Table: GPA
    unowned let l0: Stage2MMU
    public let root: DescriptorTable
    /// The L2 vCPUs' TLBs.
    public let tlbs = TLBDomain()
    /// Moves on whenever L1 asks for an invalidation, so a fault that read L1's table before retries.
    let l1Seq = Atomic<UInt64>(0)
    public static let startLevel = 0

    init(lpid: Int, l1Table: GPA, l0: Stage2MMU) {
        self.lpid = lpid
        self.l1Table = l1Table
        self.l0 = l0
        root = l0.allocator.allocate()
    }

    /// The L2 vCPUs' hardware walk of the shadow table.
    @inlinable @inline(__always)
    public func translate(_ gpa: GPA) -> Translation? {
        hardwareWalk(root: root, startLevel: Self.startLevel, ipaBits: 48, gpa)
    }

    /// Resolves an L2 fault: walk L1's table, make sure L0 maps the L1 frame for this access (a write
    /// goes through L0's fault path, so L1's dirty log records it), then install a shadow leaf of the
    /// smaller of the two sizes with the intersection of the permissions, and note it in the rmap.
    public func handleFault(_ gpa: GPA, _ access: AccessKind, cache: inout TableCache) -> NestedFaultOutcome {
        let seq = l1Seq.load(ordering: .acquiring)
        guard let (l1Leaf, l1Level) = walkL1(gpa, cache: &cache) else { return .reflect(gpa, access) }
        guard l1Leaf.permissions.contains(access.required) else { return .reflect(gpa, access) }
        let l1Size = Stage2Geometry.entrySize(l1Level)
        let gpa1 = GPA(l1Leaf.output.raw + (gpa.raw & (l1Size - 1)))

        // L0 must map the L1 frame with this permission (faulting it in, logging a write).
        var tries = 0
        while true {
            // (L0's tables are read under its lock: this thread is no L0 vCPU, so no shootdown waits for it.)
            if let t0 = l0.lock.shared({ l0.translate(gpa1) }), t0.leaf.permissions.contains(access.required) { break }
            tries += 1
            if tries > 64 { return .retry }
            switch l0.handleFault(gpa1, access, cache: &cache) {
            case .mapped, .retry: continue
            case let other: return .l1(other)
            }
        }

        cache.topUp(to: 4)
        l0.lock.lockShared()
        defer { l0.lock.unlock() }
        l0.nestedLock.lock()
        defer { l0.nestedLock.unlock() }
        // Re-check under the locks that invalidations take: L0's leaf, and L1's sequence.
        guard let t0 = l0.translate(gpa1), t0.leaf.permissions.contains(access.required),
              l1Seq.load(ordering: .acquiring) == seq else { return .retry }
        guard let slot = l0.slotTable.lookup(gpa1) else { return .l1(.mmio(gpa1, access)) }
        let size = PageSize(level: max(l1Level, t0.level))!
        let gpa2Block = gpa.alignedDown(to: size.bytes)
        let gpa1Block = gpa1.alignedDown(to: size.bytes)
        let host = t0.leaf.output + ((gpa1Block.raw) & (Stage2Geometry.entrySize(t0.level) - 1))
        // Permissions: both levels must allow; L0's write protection for logging carries over.
        let permissions = l1Leaf.permissions.intersection(t0.leaf.permissions)
        let attributes = permissions.rawValue | Descriptor.accessFlag
        if let t = translate(gpa), t.level == size.level, t.leaf.output == host {
            // The same leaf with too few permissions (installed while L0 protected the frame):
            // widen it in place. Under the nested lock, no invalidation can slip in between.
            _ = t.entry.compareExchange(t.leaf, .leaf(host, level: size.level, attributes: attributes))
        } else {
            // Shadow leaves carry no dirty state and have no shadows of their own: the break's own
            // shootdown of this guest's TLBs is all the flushing a replaced shadow leaf needs.
            var v = MapVisitor(start: gpa2Block, output: host, size: size, attributes: attributes, changes: changeHook, cache: cache)
            _ = walkStage2(root: root, startLevel: Self.startLevel, range: GPARange(start: gpa2Block, size: size.bytes), shared: true, &v)
            cache = v.cache
        }
        l0.rmap(forSlot: slot).add(RmapEntry(lpid: lpid, l2GFN: gpa2Block.gfn, size: size),
                                   frame: (gpa1Block - slot.gpaRange.start) >> 12)
        return .mapped(size)
    }

    var changeHook: ChangeHook { ChangeHook(tlbs: tlbs, retired: l0.retired, logs: nil) }

    /// L1 changed its table and asks for an invalidation: of `range` of L2 GPAs, or all of it.
    public func invalidateByL1(_ range: GPARange? = nil) {
        l0.lock.lockShared()
        defer { l0.lock.unlock() }
        l0.nestedLock.lock()
        defer { l0.nestedLock.unlock() }
        l1Seq.add(1, ordering: .releasing)
        let r = range ?? GPARange(start: GPA(0), end: GPA(1 << 48))
        var v = ShadowClearVisitor(lpid: lpid)
        _ = walkStage2(root: root, startLevel: Self.startLevel, range: r, shared: true, &v)
        // Drop the rmap entries of what was cleared: find each leaf's L1 frame from its host address.
        for (l2, size, host) in v.cleared {
            for (slot, gpa1) in l0.slotTable.slots(overlapping: HVARange(start: host, size: 1)) {
                l0.rmap(forSlot: slot).remove(RmapEntry(lpid: lpid, l2GFN: l2.gfn, size: size),
                                              frame: (gpa1.start - slot.gpaRange.start) >> 12)
            }
        }
        if let t = v.touched.range { tlbs.shootdown(t) }
    }

    /// Clears the shadow leaf of L2 frame `l2` of `size` if it still maps host page `host`. Returns
    /// the L2 range cleared. Caller holds the nested lock.
    func clear(l2 gfn: GFN, size: PageSize, host: HVA) -> GPARange? {
        let gpa = gfn.gpa
        guard let t = translate(gpa), t.level == size.level, t.leaf.output == host else { return nil }
        guard t.entry.compareExchange(t.leaf, .invalid) else { return nil }
        return GPARange(start: gpa, size: size.bytes)
    }

    /// Walks L1's table for `gpa` (an L2 GPA): the leaf and its level, or nil if L1 does not map it.
    /// L1's table pages are read through L0's stage-2, under L0's lock (taken once for the walk); a
    /// table page L0 has not mapped yet is faulted in and the walk goes on.
    private func walkL1(_ gpa: GPA, cache: inout TableCache) -> (Descriptor, Int)? {
        guard gpa.raw >> 48 == 0 else { return nil }
        var table = l1Table
        var level = Self.startLevel
        var faults = 0
        l0.lock.lockShared()
        defer { l0.lock.unlock() }
        while true {
            let at = table + UInt64(Stage2Geometry.index(gpa.raw, level)) * 8
            guard let t = l0.translate(at) else {
                faults += 1
                guard faults < 8 else { return nil }
                l0.lock.unlock()
                let outcome = l0.handleFault(at, .read, cache: &cache)
                l0.lock.lockShared()
                switch outcome {
                case .mapped, .retry: continue
                default: return nil
                }
            }
            let p = (t.hostPage(for: at) + at.pageOffset).pointer.assumingMemoryBound(to: Atomic<UInt64>.self)
            let d = Descriptor(raw: p.pointee.load(ordering: .acquiring))
            if d.isTable(level: level) {
                table = GPA(d.output.raw)
                level += 1
                continue
            }
            return d.isValid ? (d, level) : nil
        }
    }

    /// Shadow leaves and tables over the whole L2 space.
    public func census() -> CensusVisitor {
        var v = CensusVisitor()
        _ = walkStage2(root: root, startLevel: Self.startLevel, range: GPARange(start: GPA(0), end: GPA(1 << 48)), shared: true, &v)
        return v
    }
}

/// Clears every valid shadow leaf in a range by compare-and-swap, remembering each one.
struct ShadowClearVisitor: Stage2Visitor {
    let lpid: Int
    var cleared: [(GPA, PageSize, HVA)] = []
    var touched = TouchedRange()
    var visitPoints: VisitPoints { .leaf }
    mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        guard ctx.old.isValid else { return .proceed }
        guard ctx.update(.invalid) else { return .retry }
        cleared.append((ctx.addr, PageSize(level: ctx.level)!, ctx.old.output))
        touched.add(ctx.range)
        return .proceed
    }
}

/// The hardware walk shared by L0's and the shadow tables.
@inlinable @inline(__always)
public func hardwareWalk(root: DescriptorTable, startLevel: Int, ipaBits: Int, _ gpa: GPA) -> Translation? {
    guard gpa.raw >> UInt64(ipaBits) == 0 else { return nil }
    var table = root
    var level = startLevel
    while true {
        let e = table.entry(Stage2Geometry.index(gpa.raw, level))
        let d = e.load()
        if d.isTable(level: level) {
            table = d.tablePointer
            level &+= 1
            continue
        }
        return d.isValid ? Translation(leaf: d, level: level, entry: e) : nil
    }
}
