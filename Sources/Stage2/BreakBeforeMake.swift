import GuestMemory
import Synchronization

/// The three steps of replacing a valid descriptor with one of another size or output: break the
/// entry (invalidate it; in a shared walk by compare-and-swap to a locked marker, so other walkers
/// back off and retry), flush every TLB that may hold it, then make the new entry.
public struct BreakBeforeMake: @unchecked Sendable {
    public let tlbs: TLBDomain
    public let retired: RetireList

    public init(tlbs: TLBDomain, retired: RetireList) {
        self.tlbs = tlbs
        self.retired = retired
    }

    /// Steps 1 and 2. False if a shared walk lost the race for the entry (the caller retries).
    @inline(__always)
    public func breakEntry(_ ctx: VisitContext) -> Bool {
        if ctx.shared {
            guard ctx.entry.compareExchange(ctx.old, .locked) else { return false }
        } else {
            ctx.entry.store(.locked)
        }
        if ctx.old.isValid { tlbs.shootdown(ctx.range) }
        return true
    }

    /// Step 3: publish the new entry.
    @inline(__always)
    public func make(_ ctx: VisitContext, _ new: Descriptor) {
        ctx.entry.store(new)
    }

    /// Queues `table` (at `level`) and everything below it for freeing once no walker can reach them.
    /// The subtree is collected only then: a shared walker may still be adding to it now.
    public func retireSubtree(_ table: DescriptorTable, level: Int) {
        retired.add(table, level: level)
    }
}

/// Tables unlinked from the tree but perhaps still being read by a walker. They are freed only under
/// the MMU write lock (no host walker inside) after a TLB shootdown (no vCPU mid-walk): an RCU grace
/// period whose quiescent states are the vCPUs' safe points.
public final class RetireList: @unchecked Sendable {
    private let tables = Mutex<[(DescriptorTable, Int)]>([])
    public init() {}
    public func add(_ t: DescriptorTable, level: Int) { tables.withLock { $0.append((t, level)) } }

    /// Every retired table and the tables below it. Only when no walker can be inside them.
    func takeSubtrees() -> [DescriptorTable] {
        let roots = tables.withLock { t in defer { t = [] }; return t }
        var out: [DescriptorTable] = []
        for (t, level) in roots { Self.collect(t, level: level, into: &out) }
        return out
    }

    private static func collect(_ t: DescriptorTable, level: Int, into out: inout [DescriptorTable]) {
        out.append(t)
        guard level < 3 else { return }
        for i in 0..<DescriptorTable.entries {
            let d = t.load(i)
            if d.isTable(level: level) { collect(d.tablePointer, level: level + 1, into: &out) }
        }
    }
}
