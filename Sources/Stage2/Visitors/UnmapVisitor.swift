import GuestMemory

/// Clears every leaf overlapping the range (a block partly inside is unmapped whole, as on arm64)
/// and unlinks tables left empty. Exclusive walks only: it frees structure.
/// The caller flushes `touched` from the TLBs, then reclaims the retired tables.
public struct UnmapVisitor: Stage2Visitor {
    public let ops: BreakBeforeMake
    public private(set) var touched = TouchedRange()
    public private(set) var leavesCleared = 0
    /// Pages whose only dirty record was the leaf itself (DBM and W set): the caller moves them
    /// into the dirty bitmap, so unmapping never loses a write.
    public private(set) var dirtyPages: [GPA] = []

    public init(ops: BreakBeforeMake) { self.ops = ops }

    public var visitPoints: VisitPoints { [.leaf, .tablePost] }

    public mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        guard ctx.old.raw != 0 else { return .proceed }
        precondition(!ctx.shared, "unmap frees tables and must run in an exclusive walk")
        // An exchange, not a store: a vCPU may set W on a DBM leaf without holding any lock.
        let old = ctx.entry.exchange(.invalid)
        if ctx.level == 3, old.has(Descriptor.dbm | Descriptor.write) { dirtyPages.append(ctx.addr) }
        if ctx.old.isValid {
            touched.add(ctx.range)
            leavesCleared += 1
        }
        return .proceed
    }

    public mutating func visitTablePost(_ ctx: VisitContext) -> VisitResult {
        let child = ctx.old.tablePointer
        guard ctx.old.isTable(level: ctx.level), child.isEmpty else { return .proceed }
        ctx.entry.store(.invalid)
        touched.add(ctx.range)
        ops.retireSubtree(child, level: ctx.level + 1)
        return .proceed
    }
}

/// The smallest guest range covering every entry a walk changed, for one ranged TLB flush.
public struct TouchedRange: Sendable {
    public private(set) var start: UInt64 = .max
    public private(set) var end: UInt64 = 0
    public init() {}
    public var isEmpty: Bool { start >= end }
    public var range: GPARange? { isEmpty ? nil : GPARange(start: GPA(start), end: GPA(end)) }
    @inline(__always) public mutating func add(_ r: GPARange) {
        start = min(start, r.start.raw)
        end = max(end, r.end.raw)
    }
}
