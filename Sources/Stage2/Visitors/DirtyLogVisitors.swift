import DirtyLog
import GuestMemory

/// Write-protects leaves for dirty logging: W is removed and SW_LOGGED set, so the next write faults
/// into the dirty tracker. For the DBM strategy 4 KiB leaves instead become writable-clean (DBM set,
/// W clear): the vCPU sets W itself on the next write. The hook gathers what lost W for one flush.
public struct LogProtectVisitor: Stage2Visitor {
    public let dbm: Bool
    public var changes: ChangeHook

    public init(strategy: DirtyStrategy, changes: ChangeHook) {
        dbm = strategy == .dbm
        self.changes = changes
    }

    public var visitPoints: VisitPoints { .leaf }

    @inline(__always)
    public mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        let old = ctx.old
        if old.isLocked { return .retry }
        guard old.isValid else { return .proceed }
        let new = dbm && ctx.level == 3
            ? old.clearing(Descriptor.write | Descriptor.swLogged).setting(Descriptor.dbm)
            : old.clearing(Descriptor.write | Descriptor.dbm).setting(Descriptor.swLogged)
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
