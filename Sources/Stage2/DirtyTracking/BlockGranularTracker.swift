import DirtyLog
import GuestMemory

/// Block-granular logging (the s390 segment approach): blocks stay mapped; a write to a protected
/// block records all its 4 KiB pages and unprotects it whole, so a logging slot keeps the TLB reach
/// of its blocks and pays one fault per block.
public struct BlockGranularTracker: DirtyTracker {
    public init() {}
    public var strategy: DirtyStrategy? { .blockGranular }
    public func mappingSize(_ hostFit: PageSize) -> PageSize { hostFit }
    public var splitOnWrite: (set: UInt64, clear: UInt64)? { nil }
}
