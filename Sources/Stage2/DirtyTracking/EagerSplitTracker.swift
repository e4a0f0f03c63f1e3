import DirtyLog
import GuestMemory

/// Write-protect logging whose blocks are split before any write comes: all of them when logging
/// starts, and those over a range being cleared, from a pre-filled table cache, so no vCPU splits a
/// block inside a write fault.
public struct EagerSplitTracker: DirtyTracker {
    public init() {}
    public var strategy: DirtyStrategy? { .eagerSplit }
    public var splitsAhead: Bool { true }
}
