import DirtyLog
import GuestMemory

/// Write-protect logging: leaves lose W (and carry SW_LOGGED); the first write to a 4 KiB page faults,
/// makes it writable and records it. A write to a protected block splits the block first, so only the
/// page written is recorded. Everything here is the protocol's default.
public struct WriteProtectTracker: DirtyTracker {
    public init() {}
    public var strategy: DirtyStrategy? { .writeProtect }
}
