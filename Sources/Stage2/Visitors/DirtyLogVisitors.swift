import DirtyLog
import GuestMemory

/// Protects leaves for dirty logging as the slot's tracker says, so the next write is seen: W goes
/// and SW_LOGGED comes (the write faults), or for DBM 4 KiB leaves become writable-clean (the vCPU
/// sets W itself). The hook gathers what lost W for one flush.
public struct LogProtectVisitor: Stage2Visitor {
    /// The tracker's bits for 4 KiB leaves and for blocks, read once (no call per leaf).
    let pageSet: UInt64, pageClear: UInt64, blockSet: UInt64, blockClear: UInt64
    public var changes: ChangeHook

    public init(tracker: any DirtyTracker, changes: ChangeHook) {
        (pageSet, pageClear) = tracker.protection(level: 3)
        (blockSet, blockClear) = tracker.protection(level: 2)
        self.changes = changes
    }

    public var visitPoints: VisitPoints { .leaf }

    @inline(__always)
    public mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        let old = ctx.old
        if old.isLocked { return .retry }
        guard old.isValid else { return .proceed }
        let new = ctx.level == 3 ? old.clearing(pageClear).setting(pageSet) : old.clearing(blockClear).setting(blockSet)
        guard new != old else { return .proceed }
        return changes.update(ctx, new) ? .proceed : .retry
    }
}

/// The DBM harvest: every 4 KiB leaf the vCPUs made dirty (DBM and W set) is reported into a slot
/// bitmap. When `clean`, it is made writable-clean again through the hook, which records the dirty
/// state it takes into that bitmap: a write racing the harvest is either seen now or sets W again
/// afterwards (seed 001's lost-dirty-state race). Otherwise (manual protect) it is only read.
public struct DBMHarvestVisitor: Stage2Visitor {
    public let slotStart: GPA
    public let clean: Bool
    /// The caller's bitmap words (one bit per page of the slot), OR'd into.
    public let bitmap: UnsafeMutableBufferPointer<UInt64>
    public var changes: ChangeHook

    public init(slotStart: GPA, bitmap: UnsafeMutableBufferPointer<UInt64>, clean: Bool, changes: ChangeHook) {
        self.slotStart = slotStart
        self.clean = clean
        self.bitmap = bitmap
        self.changes = changes
        self.changes.recordDirty(into: bitmap, base: slotStart)
    }

    public var visitPoints: VisitPoints { .leaf }

    @inline(__always)
    public mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        let old = ctx.old
        if old.isLocked { return .retry }
        guard ctx.level == 3, old.isValid, old.has(Descriptor.dbm | Descriptor.write) else { return .proceed }
        if clean { return changes.update(ctx, old.clearing(Descriptor.write)) ? .proceed : .retry }
        let page = (ctx.addr - slotStart) >> 12
        bitmap[Int(page >> 6)] |= 1 << (page & 63)
        return .proceed
    }
}
