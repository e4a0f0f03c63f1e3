import DirtyLog
import GuestMemory

/// The tracker of a slot that does not log: faults map the largest leaf the backing allows, with every
/// permission the slot grants, and record nothing.
public struct NotLogging: DirtyTracker {
    public init() {}
    public var strategy: DirtyStrategy? { nil }
    public func mappingSize(_ hostFit: PageSize) -> PageSize { hostFit }
    public func protection(level: Int) -> (set: UInt64, clear: UInt64) { (0, 0) }
    public func faultLeaf(_ attributes: UInt64, write: Bool, size: PageSize) -> (attributes: UInt64, recordAfter: Bool) {
        (attributes, false)
    }
    public var splitOnWrite: (set: UInt64, clear: UInt64)? { nil }
}
