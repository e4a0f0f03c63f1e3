import GuestMemory

/// When the walker calls a visitor.
public struct VisitPoints: OptionSet, Sendable {
    public let rawValue: UInt8
    @inlinable public init(rawValue: UInt8) { self.rawValue = rawValue }
    // Computed, not stored: a stored static goes through a once-initialised accessor on every use.
    /// At every leaf or invalid entry overlapping the range.
    @inlinable public static var leaf: VisitPoints { VisitPoints(rawValue: 1 << 0) }
    /// At a table entry, before descending into it.
    @inlinable public static var tablePre: VisitPoints { VisitPoints(rawValue: 1 << 1) }
    /// At a table entry, after its whole sub-range has been walked.
    @inlinable public static var tablePost: VisitPoints { VisitPoints(rawValue: 1 << 2) }
}

/// What a visitor tells the walker.
@frozen
public enum VisitResult: Sendable {
    /// Go on: reload the entry (the visitor may have changed it), descend if it is now a table.
    case proceed
    /// A compare-and-swap lost a race or the entry is locked by another walker: read it again and revisit.
    case retry
    /// End the walk now.
    case stop
}

/// One visit: the entry, its value as read once, and where it sits.
@frozen
public struct VisitContext {
    public let entry: DescriptorPointer
    /// The descriptor as the walker read it. A visitor compares against this, never re-reads silently.
    public let old: Descriptor
    /// Guest-physical address of the start of what this entry maps.
    public let addr: GPA
    public let level: Int
    /// True in a shared walk: every update must be a compare-and-swap against `old`.
    public let shared: Bool

    @inlinable @inline(__always)
    public init(entry: DescriptorPointer, old: Descriptor, addr: GPA, level: Int, shared: Bool) {
        self.entry = entry
        self.old = old
        self.addr = addr
        self.level = level
        self.shared = shared
    }

    @inlinable @inline(__always) public var size: UInt64 { Stage2Geometry.entrySize(level) }
    @inlinable @inline(__always) public var range: GPARange { GPARange(start: addr, size: size) }

    /// Replaces `old` with `new`: a store in an exclusive walk, a compare-and-swap in a shared one.
    @inlinable @inline(__always) public func update(_ new: Descriptor) -> Bool {
        #if VMM_UNSAFE_NO_CAS
        // Test-only build setting: a blind store, to show the lost-update tests fail without CAS.
        entry.store(new)
        return true
        #else
        if shared { return entry.compareExchange(old, new) }
        #endif
        entry.store(new)
        return true
    }
}

/// An operation on a range of the stage-2 table. The walker is generic over it, so each visitor is
/// specialized and inlined into its own walk loop: no existential or closure per entry.
public protocol Stage2Visitor {
    var visitPoints: VisitPoints { get }
    /// The deepest level whose entries the visitor wants to see: the walk does not descend into tables
    /// below it (a split to 4 KiB has nothing to do inside a table of 4 KiB leaves).
    var deepestLevel: Int { get }
    mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult
    mutating func visitTablePre(_ ctx: VisitContext) -> VisitResult
    mutating func visitTablePost(_ ctx: VisitContext) -> VisitResult
}

extension Stage2Visitor {
    @inlinable public var deepestLevel: Int { 3 }
    @inlinable public mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult { .proceed }
    @inlinable public mutating func visitTablePre(_ ctx: VisitContext) -> VisitResult { .proceed }
    @inlinable public mutating func visitTablePost(_ ctx: VisitContext) -> VisitResult { .proceed }
}

public enum Stage2Geometry {
    /// Bytes mapped by one entry at `level` (level 3: 4 KiB, 2: 2 MiB, 1: 1 GiB, 0: 512 GiB).
    @inlinable @inline(__always) public static func entrySize(_ level: Int) -> UInt64 { 1 << shift(level) }
    @inlinable @inline(__always) public static func shift(_ level: Int) -> UInt64 { UInt64(12 + 9 * (3 - level)) }
    @inlinable @inline(__always) public static func index(_ addr: UInt64, _ level: Int) -> Int {
        Int(truncatingIfNeeded: (addr >> shift(level)) & 511)
    }
    /// Root level for an IPA size: 48 bits start at level 0, 39 bits at level 1.
    @inlinable public static func startLevel(ipaBits: Int) -> Int { ipaBits > 39 ? 0 : 1 }
}

/// The one stage-2 walker: iterative (an explicit stack, no recursion), over `range`, calling the
/// visitor at the points it asks for. Every other operation on the table is a visitor of this walk.
///
/// Returns false if a visitor stopped the walk.
@inlinable
public func walkStage2<V: Stage2Visitor>(root: DescriptorTable, startLevel: Int, range: GPARange,
                                         shared: Bool, _ visitor: inout V) -> Bool {
    guard !range.isEmpty else { return true }
    let points = visitor.visitPoints
    let atLeaf = points.contains(.leaf), atPre = points.contains(.tablePre), atPost = points.contains(.tablePost)
    let deepest = visitor.deepestLevel
    let end = range.end.raw
    var addr = range.start.raw
    var level = startLevel
    var table = root
    // Parent tables and the index of the entry we descended through, per level.
    var parents = InlineArray<4, DescriptorTable>(repeating: root)
    var parentIndex = InlineArray<4, Int>(repeating: 0)

    while true {
        // `base` is the start of the last entry handled, `next` the address after it.
        var base: UInt64
        var next: UInt64
        var overflow = false
        if level == 3 {
            // A last-level table holds only pages: run through the entries this range covers in a
            // tight loop, with no table or boundary checks per entry.
            let stop = min(end, (addr | 0x1F_FFFF) &+ 1)
            var a = addr
            if atLeaf {
                while a < stop {
                    let e = table.entry(Stage2Geometry.index(a, 3))
                    switch visitor.visitLeaf(VisitContext(entry: e, old: e.load(), addr: GPA(a & ~0xFFF), level: 3, shared: shared)) {
                    case .retry: continue
                    case .stop: return false
                    case .proceed: a = (a & ~0xFFF) &+ 4096
                    }
                }
            } else {
                a = ((stop &- 1) & ~0xFFF) &+ 4096
            }
            next = a
            base = a &- 4096
        } else {
            let idx = Stage2Geometry.index(addr, level)
            let entry = table.entry(idx)
            let size = Stage2Geometry.entrySize(level)
            base = addr & ~(size - 1)
            var old = entry.load()
            var isTable = old.isTable(level: level)
            var result = VisitResult.proceed
            if isTable, atPre {
                result = visitor.visitTablePre(VisitContext(entry: entry, old: old, addr: GPA(base), level: level, shared: shared))
                old = entry.load()
                isTable = old.isTable(level: level)
            } else if !isTable, atLeaf {
                result = visitor.visitLeaf(VisitContext(entry: entry, old: old, addr: GPA(base), level: level, shared: shared))
                old = entry.load()
                isTable = old.isTable(level: level)
            }
            switch result {
            case .stop: return false
            case .retry: continue
            case .proceed: break
            }
            if isTable && level < deepest {
                parents[level] = table
                parentIndex[level] = idx
                table = old.tablePointer
                level += 1
                continue
            }
            (next, overflow) = base.addingReportingOverflow(size)
        }
        // Climb out of every table this step leaves, visiting each on the way up.
        addr = next
        let done = overflow || next >= end
        while level > startLevel && (done || Stage2Geometry.index(addr, level) == 0) {
            level -= 1
            table = parents[level]
            if atPost {
                let i = parentIndex[level]
                let e = table.entry(i)
                let pbase = (done ? base : addr &- 1) & ~(Stage2Geometry.entrySize(level) - 1)
                var post = VisitResult.retry
                while case .retry = post {
                    post = visitor.visitTablePost(VisitContext(entry: e, old: e.load(), addr: GPA(pbase), level: level, shared: shared))
                }
                if case .stop = post { return false }
            }
        }
        if done || (level == startLevel && Stage2Geometry.index(addr, level) == 0) { return true }
    }
}
