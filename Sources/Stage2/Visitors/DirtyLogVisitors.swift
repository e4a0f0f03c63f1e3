import DirtyLog
import GuestMemory

/// Write-protects leaves for dirty logging: W is removed and SW_LOGGED set, so the next write faults
/// into the dirty tracker. For the DBM strategy 4 KiB leaves instead become writable-clean (DBM set,
/// W clear): the vCPU sets W itself on the next write. Records what lost W, for one ranged flush.
public struct LogProtectVisitor: Stage2Visitor {
    public let dbm: Bool
    public private(set) var touched = TouchedRange()

    public init(strategy: DirtyStrategy) { dbm = strategy == .dbm }

    public var visitPoints: VisitPoints { .leaf }

    public mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        let old = ctx.old
        if old.isLocked { return .retry }
        guard old.isValid else { return .proceed }
        let new = dbm && ctx.level == 3
            ? old.clearing(Descriptor.write | Descriptor.swLogged).setting(Descriptor.dbm)
            : old.clearing(Descriptor.write | Descriptor.dbm).setting(Descriptor.swLogged)
        guard new != old else { return .proceed }
        guard ctx.update(new) else { return .retry }
        if old.has(Descriptor.write) { touched.add(ctx.range) }
        return .proceed
    }
}

/// The DBM harvest: reports every 4 KiB leaf the vCPUs made dirty (DBM and W set) into a slot bitmap
/// and, when `clean`, makes it writable-clean again by compare-and-swap, so a write racing the harvest
/// is either seen now or sets W again afterwards (seed 001's lost-dirty-state race).
public struct DBMHarvestVisitor: Stage2Visitor {
    public let slotStart: GPA
    public let clean: Bool
    /// The caller's bitmap words (one bit per page of the slot), OR'd into.
    public let bitmap: UnsafeMutableBufferPointer<UInt64>
    public private(set) var touched = TouchedRange()

    public init(slotStart: GPA, bitmap: UnsafeMutableBufferPointer<UInt64>, clean: Bool) {
        self.slotStart = slotStart
        self.clean = clean
        self.bitmap = bitmap
    }

    public var visitPoints: VisitPoints { .leaf }

    public mutating func visitLeaf(_ ctx: VisitContext) -> VisitResult {
        let old = ctx.old
        if old.isLocked { return .retry }
        guard ctx.level == 3, old.isValid, old.has(Descriptor.dbm | Descriptor.write) else { return .proceed }
        if clean {
            guard ctx.update(old.clearing(Descriptor.write)) else { return .retry }
            touched.add(ctx.range)
        }
        let page = (ctx.addr - slotStart) >> 12
        bitmap[Int(page >> 6)] |= 1 << (page & 63)
        return .proceed
    }
}
