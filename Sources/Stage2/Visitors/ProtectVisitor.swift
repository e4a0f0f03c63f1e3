import GuestMemory

/// Changes the attributes of every valid leaf overlapping the range: sets `set`, clears `clear`.
/// In a shared walk each change is a compare-and-swap; a lost race re-reads the entry and tries again,
/// so a concurrent change (a vCPU setting the access flag, another walker) is never overwritten.
/// Removed permissions are gathered by the hook for the caller's flush.
public struct ProtectVisitor: Stage2Visitor {
    public let set: UInt64
    public let clear: UInt64
    public var changes: ChangeHook
    public private(set) var leavesChanged = 0

    public init(set: UInt64 = 0, clear: UInt64 = 0, changes: ChangeHook) {
        self.set = set
        self.clear = clear
        self.changes = changes
    }

    public var visitPoints: VisitPoints { .leaf }

    @inline(__always)
    public mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        if ctx.old.isLocked { return .retry }
        guard ctx.old.isValid else { return .proceed }
        let new = Descriptor(raw: (ctx.old.raw & ~clear) | set)
        guard new != ctx.old else { return .proceed }
        guard changes.update(ctx, new) else { return .retry }
        leavesChanged += 1
        return .proceed
    }
}

/// Test-and-clear of the access flag (page ageing): counts leaves used since the last pass and clears
/// their flag. No TLB flush, as on arm64: ageing is a hint, and a cached entry only delays the next set.
public struct AccessFlagVisitor: Stage2Visitor {
    public private(set) var young = 0
    public private(set) var youngPages: [GPARange] = []
    public let record: Bool
    public var changes: ChangeHook

    public init(record: Bool = false, changes: ChangeHook) {
        self.record = record
        self.changes = changes
    }

    public var visitPoints: VisitPoints { .leaf }

    @inline(__always)
    public mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        if ctx.old.isLocked { return .retry }
        guard ctx.old.isValid, ctx.old.has(Descriptor.accessFlag) else { return .proceed }
        guard changes.update(ctx, ctx.old.clearing(Descriptor.accessFlag)) else { return .retry }
        young += 1
        if record { youngPages.append(ctx.range) }
        return .proceed
    }
}

/// Reads the leaf (if any) mapping one address: the software way to ask "what maps this?".
public struct LeafLookupVisitor: Stage2Visitor {
    public private(set) var leaf: Descriptor?
    public private(set) var level = 0
    public init() {}
    public var visitPoints: VisitPoints { .leaf }
    @inline(__always)
    public mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        if ctx.old.isValid { leaf = ctx.old; level = ctx.level }
        return .stop
    }
}

/// Counts tables and leaves by level over a range.
public struct CensusVisitor: Stage2Visitor {
    /// Indexed by level 0...3.
    public private(set) var tables = [0, 0, 0, 0]
    public private(set) var leaves = [0, 0, 0, 0]
    public init() {}
    public var visitPoints: VisitPoints { [.leaf, .tablePre] }
    public mutating func visitTablePre(_ ctx: VisitContext) -> VisitResult {
        tables[ctx.level + 1] += 1
        return .proceed
    }
    @inline(__always)
    public mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        if ctx.old.isValid { leaves[ctx.level] += 1 }
        return .proceed
    }
    /// Bytes of table memory below the root (each table is 4 KiB), plus the root.
    public var tableBytes: UInt64 { UInt64((tables.reduce(0, +) + 1) * DescriptorTable.bytes) }
}
