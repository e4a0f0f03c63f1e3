import DirtyLog
import GuestMemory

/// The hardware dirty bit: 4 KiB leaves are writable-clean (DBM set, W clear) and the vCPU sets W
/// itself on the first write, with no fault; W is the page's dirty record, which a harvest walks for
/// and cleans. Blocks are split ahead, into writable-clean pages.
public struct DBMTracker: DirtyTracker {
    public init() {}
    public var strategy: DirtyStrategy? { .dbm }
    public func protection(level: Int) -> (set: UInt64, clear: UInt64) {
        level == 3 ? (Descriptor.dbm, Descriptor.write | Descriptor.swLogged) : (Descriptor.swLogged, Descriptor.write | Descriptor.dbm)
    }
    /// A 4 KiB leaf a write fault installs records itself: writable and dirty (DBM and W) at once.
    public func faultLeaf(_ attributes: UInt64, write: Bool, size: PageSize) -> (attributes: UInt64, recordAfter: Bool) {
        if write { return size == .size4K ? (attributes | Descriptor.dbm, false) : (attributes, true) }
        let p = protection(level: size.level)
        return ((attributes & ~p.clear) | p.set, false)
    }
    public var splitOnWrite: (set: UInt64, clear: UInt64)? { (Descriptor.dbm, Descriptor.swLogged) }
    /// Blocks split when logging starts: a write to a block would fault and split it, and the point of
    /// DBM is that writes do not fault.
    public var splitsAhead: Bool { true }
    public var leavesRecord: Bool { true }
}
