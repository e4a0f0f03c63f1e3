import DirtyLog
import GuestMemory

/// Dirty rings (KVM_CAP_DIRTY_LOG_RING): write-protect faults as for `wp`, but each newly dirtied page
/// goes into the faulting vCPU's bounded ring; a vCPU whose ring is full exits before dirtying another
/// page, and a harvest drains the rings and resets them (re-protecting their pages).
public struct RingTracker: DirtyTracker {
    public init() {}
    public var strategy: DirtyStrategy? { .ring }
    public var usesRings: Bool { true }
}
