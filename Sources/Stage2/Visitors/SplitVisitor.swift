import GuestMemory

/// Splits every block overlapping the range down to leaves of `target` size, keeping each translation
/// and its attributes. The whole new subtree (a 1 GiB block's 512 tables of 4 KiB leaves, where they
/// overlap the range) is built off to the side from the cache and swapped in by one break-before-make:
/// one shootdown per block, and no vCPU ever sees a half-split block.
public struct SplitVisitor: Stage2Visitor {
    public let range: GPARange
    public let target: Int
    public var changes: ChangeHook
    public var cache: TableCache
    /// Attribute bits set and cleared on the target-size leaves (e.g. DBM-clean pages from a logged block).
    public let leafSet: UInt64
    public let leafClear: UInt64
    /// Blocks replaced by tables, those inside a built subtree included.
    public private(set) var blocksSplit = 0

    public init(_ range: GPARange, to size: PageSize, changes: ChangeHook, cache: TableCache, leafSet: UInt64 = 0, leafClear: UInt64 = 0) {
        self.range = range
        self.target = size.level
        self.changes = changes
        self.cache = cache
        self.leafSet = leafSet
        self.leafClear = leafClear
    }

    public var visitPoints: VisitPoints { .leaf }
    /// Only blocks larger than the target split: tables of target-size leaves are not entered.
    public var deepestLevel: Int { target - 1 }

    @inline(__always)
    public mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        let old = ctx.old
        if old.isLocked { return .retry }
        guard old.isValid, ctx.level < target, ctx.range.overlaps(range) else { return .proceed }
        var built = 0
        let table = subtree(of: old, at: ctx.addr, level: ctx.level, built: &built)
        guard changes.breakEntry(ctx) else {
            release(table, level: ctx.level + 1)
            return .retry
        }
        changes.make(ctx, .table(table.raw))
        blocksSplit += built
        return .proceed
    }

    /// The table mapping what `block` (at `level`, mapping from `addr`) maps, one level down; children
    /// still above the target that overlap the range are split the same way. Nothing is published.
    mutating func subtree(of block: Descriptor, at addr: GPA, level: Int, built: inout Int) -> DescriptorTable {
        let table = cache.take()
        built += 1
        let childLevel = level + 1
        let childSize = Stage2Geometry.entrySize(childLevel)
        var attributes = (block.raw & Descriptor.attributeMask) | Descriptor.swSplit
        if childLevel == target { attributes = (attributes & ~leafClear) | leafSet }
        var out = block.output
        var childAddr = addr
        for i in 0..<DescriptorTable.entries {
            var d = Descriptor.leaf(out, level: childLevel, attributes: attributes)
            if childLevel < target && GPARange(start: childAddr, size: childSize).overlaps(range) {
                d = .table(subtree(of: d, at: childAddr, level: childLevel, built: &built).raw)
            }
            table.entry(i).store(d)
            out = out + childSize
            childAddr = childAddr + childSize
        }
        return table
    }

    /// Gives a subtree that lost its race back to the cache.
    mutating func release(_ table: DescriptorTable, level: Int) {
        for i in 0..<DescriptorTable.entries {
            let d = table.load(i)
            if d.isTable(level: level) { release(d.tablePointer, level: level + 1) }
            table.entry(i).store(.invalid)
        }
        cache.giveBack(table)
    }
}

/// Collapses tables whose 512 leaves map one contiguous, block-aligned host range with the same
/// permissions back into a single block (bottom-up, so 4 KiB pages can become 2 MiB blocks and then
/// a 1 GiB block in one walk). Only tables wholly inside the range and at block levels are considered;
/// `maxSize` caps the block size (the host backing's page size).
public struct CollapseVisitor: Stage2Visitor {
    public let range: GPARange
    public let maxLevel: Int
    public var changes: ChangeHook
    public private(set) var collapsed = 0

    public init(range: GPARange, maxSize: PageSize, changes: ChangeHook) {
        self.range = range
        self.maxLevel = maxSize.level
        self.changes = changes
    }

    public var visitPoints: VisitPoints { .tablePost }

    public mutating func visitTablePost(_ ctx: VisitContext) -> VisitResult {
        guard ctx.level >= maxLevel, ctx.level >= 1, ctx.old.isTable(level: ctx.level),
              ctx.addr >= range.start, ctx.addr + ctx.size <= range.end else { return .proceed }
        let child = ctx.old.tablePointer
        let childLevel = ctx.level + 1
        let childSize = Stage2Geometry.entrySize(childLevel)
        let first = child.load(0)
        guard first.isLeaf(level: childLevel), first.output.isAligned(to: ctx.size) else { return .proceed }
        // Attributes that must agree; the access flag and software bookkeeping may differ.
        let mustMatch = Descriptor.read | Descriptor.write | Descriptor.execute | Descriptor.dbm | Descriptor.swLogged
        var anyYoung = false, anyDirty = false
        for i in 0..<DescriptorTable.entries {
            let d = child.load(i)
            guard d.isLeaf(level: childLevel),
                  d.output == first.output + UInt64(i) * childSize,
                  d.raw & mustMatch == first.raw & mustMatch else { return .proceed }
            anyYoung = anyYoung || d.has(Descriptor.accessFlag)
            anyDirty = anyDirty || d.has(Descriptor.swDirty)
        }
        var attributes = first.raw & mustMatch
        if anyYoung { attributes |= Descriptor.accessFlag }
        if anyDirty { attributes |= Descriptor.swDirty }
        guard changes.breakEntry(ctx) else { return .retry }
        changes.make(ctx, .leaf(first.output, level: ctx.level, attributes: attributes))
        collapsed += 1
        return .proceed
    }
}
