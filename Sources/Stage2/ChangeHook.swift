import GuestMemory
import Synchronization

/// The one place every stage-2 descriptor change passes through (the TDP MMU's handle_changed_spte):
/// updates, breaks, makes and exchanges all call `changed`, which
/// - records dirty state the change takes away (a DBM leaf's W bit is a page's only dirty record) in
///   its slot's log, or in the harvest's own bitmap,
/// - gathers the range every cached copy of the old entry must leave: vCPU TLBs and nested shadow
///   tables, flushed once by the MMU when the walk is done (`Stage2MMU.commit`),
/// - retires a table the change unlinks, to be freed once no walker can be inside it.
///
/// Break-before-make is three steps on it: break (invalidate to a locked marker, so other walkers back
/// off), shoot the old entry down from every TLB, make the new one.
public struct ChangeHook {
    // Unowned: a hook lives for one walk of the MMU that owns both, and the fault path makes one per
    // fault, where retain/release traffic on the two references cost ~30 ns a write fault.
    unowned(unsafe) let tlbs: TLBDomain
    unowned(unsafe) let retired: RetireList
    /// The MMU whose slot logs keep dirty state a change takes outside a harvest (none for nested
    /// shadow tables, which carry no dirty state). Every walk holds its lock.
    unowned(unsafe) let logs: Stage2MMU?
    /// The guest range whose cached translations changed.
    public internal(set) var touched = TouchedRange()
    /// Where taken dirty state goes when it falls inside: bit i = the page at `dirtyBase` + 4 KiB * i.
    var dirtyBase = GPA(0)
    var dirtyBitmap: UnsafeMutableBufferPointer<UInt64>?
    /// The walk consumes dirty state on purpose: a clear the VMM asked for forgets what it takes.
    var forgetsDirty = false

    // Only plain values and unowned references: a hook is made per walk and per fault, and a visitor
    // carrying it stays a trivial struct the walk loop keeps in registers.
    public init(tlbs: TLBDomain, retired: RetireList, logs: Stage2MMU?) {
        self.tlbs = tlbs
        self.retired = retired
        self.logs = logs
    }

    /// Sends taken dirty state for pages from `base` on into `bitmap` (a harvest's own output).
    public mutating func recordDirty(into bitmap: UnsafeMutableBufferPointer<UInt64>, base: GPA) {
        dirtyBitmap = bitmap
        dirtyBase = base
    }

    /// Makes the walk a clear: dirty state it takes is forgotten, as the VMM asked.
    public mutating func forgetDirty() { forgetsDirty = true }

    /// Replaces `ctx.old` with `new`. A shared walk compares and swaps (false: it lost a race; the
    /// walker re-reads and revisits). An exclusive walk stores, except over a writable-clean DBM leaf,
    /// the one kind a vCPU could make dirty without the lock (ours log such writes in their TLB's
    /// buffer, but nothing here may rely on that): it exchanges, and judges the value it took away.
    @inline(__always)
    public mutating func update(_ ctx: VisitContext, _ new: Descriptor) -> Bool {
        var old = ctx.old
        #if VMM_UNSAFE_NO_CAS
        // Test-only build setting: a blind store, to show the lost-update tests fail without CAS.
        ctx.entry.store(new)
        #else
        if ctx.shared {
            guard ctx.entry.compareExchange(old, new) else { return false }
        } else if old.raw & (Descriptor.dbm | Descriptor.write) == Descriptor.dbm && !forgetsDirty {
            old = ctx.entry.exchange(new)
        } else {
            ctx.entry.store(new)
        }
        #endif
        changed(ctx, from: old, to: new)
        return true
    }

    /// A change that only grants (write permission back after a logged fault, permissions relaxed to
    /// what the slot allows): it takes no dirty state and leaves no cached copy stale, so there is
    /// nothing to record, and the fault path makes no hook for it. By compare-and-swap: vCPUs and other
    /// faults may be changing the leaf.
    @inline(__always)
    public static func grant(_ ctx: VisitContext, _ new: Descriptor) -> Bool {
        assert(ctx.old.raw & ~new.raw & (Descriptor.read | Descriptor.write | Descriptor.execute | Descriptor.dbm | Descriptor.addressMask) == 0,
               "a grant takes nothing away")
        return ctx.entry.compareExchange(ctx.old, new)
    }

    /// Break-before-make, steps 1 and 2: the entry is invalidated (to a locked marker) and shot down
    /// from every vCPU TLB before anything new is made. False if a shared walk lost the race.
    @inline(__always)
    public mutating func breakEntry(_ ctx: VisitContext) -> Bool {
        guard update(ctx, .locked) else { return false }
        if ctx.old.isValid { tlbs.shootdown(ctx.range) }
        return true
    }

    /// Step 3: publish the new entry over the locked marker (nothing was cached of the marker).
    @inline(__always)
    public func make(_ ctx: VisitContext, _ new: Descriptor) {
        ctx.entry.store(new)
    }

    /// What changing an entry from `old` to `new` means for dirty state, cached translations and
    /// table memory. Every change above goes through here.
    @inline(__always)
    public mutating func changed(_ ctx: VisitContext, from old: Descriptor, to new: Descriptor) {
        guard old.isValid else { return }
        let kind = Descriptor.valid | Descriptor.tableOrPage | Descriptor.addressMask
        if (old.raw ^ new.raw) & kind == 0 {
            // The same table, or a leaf with the same output whose attributes changed: what matters
            // is a permission taken (cached copies must go) and a DBM leaf's W taken (its dirty record).
            // A DBM leaf is writable in vCPU TLBs through DBM alone, and DBM+W is its dirty record.
            let removed = old.raw & ~new.raw
            let writable = Descriptor.write | Descriptor.dbm
            if removed & (Descriptor.read | Descriptor.write | Descriptor.execute) != 0
                || (old.raw & writable != 0 && new.raw & writable == 0) {
                touched.add(ctx.range)
            }
            if ctx.level == 3 && old.has(writable) && !new.has(writable) { takeDirty(ctx.addr) }
            return
        }
        replaced(ctx, old)
    }

    /// Unmapped, broken, replaced or redirected: every cached copy goes, an unlinked table is retired,
    /// a dirty DBM leaf's record is kept. Out of line: the hot walks change attributes only.
    @inline(never)
    mutating func replaced(_ ctx: VisitContext, _ old: Descriptor) {
        touched.add(ctx.range)
        if old.isTable(level: ctx.level) {
            retired.add(old.tablePointer, level: ctx.level + 1)
        } else if ctx.level == 3 && old.has(Descriptor.dbm | Descriptor.write) {
            takeDirty(ctx.addr)
        }
    }

    @inline(never)
    mutating func takeDirty(_ gpa: GPA) {
        if let bitmap = dirtyBitmap, gpa >= dirtyBase {
            let page = (gpa - dirtyBase) >> 12
            if page < UInt64(bitmap.count) << 6 {
                bitmap[Int(page >> 6)] |= 1 << (page & 63)
                return
            }
        }
        if forgetsDirty { return }
        assert(logs != nil, "a shadow table change took dirty state")
        logs?.keepDirty(gpa)
    }
}

/// Tables unlinked from the tree but perhaps still being read by a walker. They are freed only under
/// the MMU write lock (no host walker inside) after a TLB shootdown (no vCPU mid-walk): an RCU grace
/// period whose quiescent states are the vCPUs' safe points.
public final class RetireList: Sendable {
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
