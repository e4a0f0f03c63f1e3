import DirtyLog
import GuestMemory

/// How one dirty-logging strategy tracks a slot's writes: each question the MMU asks of a strategy
/// (at enable, at a fault, at a harvest, when it protects a page), answered in the strategy's own file.
/// A logging slot's log holds its tracker; a slot that does not log is answered by `NotLogging`.
public protocol DirtyTracker: Sendable {
    /// The strategy, or nil for a slot not logging.
    var strategy: DirtyStrategy? { get }
    /// The largest leaf a fault may install, given the largest the host backing and slot allow.
    func mappingSize(_ hostFit: PageSize) -> PageSize
    /// Attribute bits set and cleared to protect a leaf at `level`, so its next write is seen (at
    /// enable, and at a clear or harvest of its page).
    func protection(level: Int) -> (set: UInt64, clear: UInt64)
    /// The attributes of a leaf a fault installs (`attributes` grants what the slot allows) and whether
    /// the MMU records the access once the leaf is in (false: nothing to record, or the leaf records
    /// itself).
    func faultLeaf(_ attributes: UInt64, write: Bool, size: PageSize) -> (attributes: UInt64, recordAfter: Bool)
    /// A write to a protected block: split it to 4 KiB leaves with these bits set and cleared, or, if
    /// nil, record the whole block and unprotect it.
    var splitOnWrite: (set: UInt64, clear: UInt64)? { get }
    /// Blocks are split before writes come: when logging starts and over a range being cleared.
    var splitsAhead: Bool { get }
    /// The leaves hold dirty state of their own (DBM's W), which a harvest walks for.
    var leavesRecord: Bool { get }
    /// Writes go into the vCPU's dirty ring, which a harvest drains first.
    var usesRings: Bool { get }
}

extension DirtyTracker {
    public func mappingSize(_ hostFit: PageSize) -> PageSize { .size4K }
    public func protection(level: Int) -> (set: UInt64, clear: UInt64) {
        (Descriptor.swLogged, Descriptor.write | Descriptor.dbm)
    }
    public func faultLeaf(_ attributes: UInt64, write: Bool, size: PageSize) -> (attributes: UInt64, recordAfter: Bool) {
        if write { return (attributes, true) }
        let p = protection(level: size.level)
        return ((attributes & ~p.clear) | p.set, false)
    }
    public var splitOnWrite: (set: UInt64, clear: UInt64)? { (0, 0) }
    public var splitsAhead: Bool { false }
    public var leavesRecord: Bool { false }
    public var usesRings: Bool { false }
}

extension DirtyStrategy {
    /// The tracker that carries out this strategy.
    public var tracker: any DirtyTracker {
        switch self {
        case .writeProtect: return WriteProtectTracker()
        case .eagerSplit: return EagerSplitTracker()
        case .blockGranular: return BlockGranularTracker()
        case .dbm: return DBMTracker()
        case .ring: return RingTracker()
        }
    }
}
