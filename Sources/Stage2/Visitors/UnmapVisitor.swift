import GuestMemory

/// Clears every leaf overlapping the range (a block partly inside is unmapped whole, as on arm64)
/// and unlinks tables left empty. Exclusive walks only: it frees structure. Its changes go through
/// the hook: the MMU flushes what they touched, keeps the dirty state they took, reclaims the tables.
public struct UnmapVisitor: Stage2Visitor {
    public var changes: ChangeHook
    public private(set) var leavesCleared = 0

    public init(changes: ChangeHook) { self.changes = changes }

    public var visitPoints: VisitPoints { [.leaf, .tablePost] }

    @inline(__always)
    public mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        guard ctx.old.raw != 0 else { return .proceed }
        precondition(!ctx.shared, "unmap frees tables and must run in an exclusive walk")
        _ = changes.update(ctx, .invalid)
        if ctx.old.isValid { leavesCleared += 1 }
        return .proceed
    }

    public mutating func visitTablePost(_ ctx: VisitContext) -> VisitResult {
        guard ctx.old.isTable(level: ctx.level), ctx.old.tablePointer.isEmpty else { return .proceed }
        _ = changes.update(ctx, .invalid)
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
