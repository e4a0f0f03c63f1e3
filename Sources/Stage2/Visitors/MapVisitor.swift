import GuestMemory

/// Installs leaves of one size mapping a guest range to a contiguous host range.
///
/// On the way down it creates missing tables (from the walker's table cache). Where a block already
/// maps part of the range at a higher level, or a table sits where the new block goes, the old entry is
/// replaced by break-before-make. A valid leaf with the same output only has its attributes updated.
/// Every change goes through the hook: a replaced leaf's range leaves the TLBs and nested shadows, a
/// replaced DBM-dirty leaf keeps its dirty state, a replaced subtree is retired.
public struct MapVisitor: Stage2Visitor {
    public let start: GPA
    public let output: HVA
    public let level: Int
    public let attributes: UInt64
    public var changes: ChangeHook
    public var cache: TableCache
    /// Leaves written and tables created, for the caller.
    public private(set) var leavesInstalled = 0
    public private(set) var tablesCreated = 0

    public init(start: GPA, output: HVA, size: PageSize, attributes: UInt64, changes: ChangeHook, cache: TableCache) {
        self.start = start
        self.output = output
        self.level = size.level
        self.attributes = attributes
        self.changes = changes
        self.cache = cache
    }

    public var visitPoints: VisitPoints { [.leaf, .tablePre] }

    /// A table where our block goes: replace the whole subtree (this is how a fault re-collapses
    /// a range to a block once splitting is no longer needed).
    public mutating func visitTablePre(_ ctx: VisitContext) -> VisitResult {
        guard ctx.level == level else { return .proceed }
        let new = leafFor(ctx)
        guard changes.breakEntry(ctx) else { return .retry }
        changes.make(ctx, new)
        leavesInstalled += 1
        return .proceed
    }

    @inline(__always)
    public mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        let old = ctx.old
        if old.isLocked { return .retry }
        if ctx.level == level {
            let new = leafFor(ctx)
            if old == new { return .proceed }
            if !old.isValid {
                guard changes.update(ctx, new) else { return .retry }
            } else if old.output == new.output {
                // Already mapped. A fault (shared walk) leaves it alone: whoever mapped it, or
                // write-protected it since, decided its attributes, and widening them is the
                // permission-fault path's job.
                if ctx.shared { return .proceed }
                // An explicit map sets the attributes in place (no break needed), keeping the access
                // flag a vCPU may have set; a removed permission must leave the TLBs.
                let merged = new.setting(old.raw & Descriptor.accessFlag)
                guard changes.update(ctx, merged) else { return .retry }
            } else {
                guard changes.breakEntry(ctx) else { return .retry }
                changes.make(ctx, new)
            }
            leavesInstalled += 1
            return .proceed
        }
        // Above the target level: we need a table here.
        let table = cache.take()
        if old.isValid {
            // A larger block covers the range: break it and start an empty table; the rest of the
            // block's pages fault back in on demand.
            guard changes.breakEntry(ctx) else { cache.giveBack(table); return .retry }
            changes.make(ctx, .table(table.raw))
        } else if !changes.update(ctx, .table(table.raw)) {
            cache.giveBack(table)
            return .retry
        }
        tablesCreated += 1
        return .proceed
    }

    @inline(__always)
    func leafFor(_ ctx: VisitContext) -> Descriptor {
        .leaf(output + (ctx.addr - start), level: level, attributes: attributes)
    }
}
