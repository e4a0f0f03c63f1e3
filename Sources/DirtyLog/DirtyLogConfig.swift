import GuestMemory

// The words of dirty logging that every layer above the host memory shares: the stage-2 MMU, the KVM
// backend and the migration engine speak them without importing each other.

/// How a memslot's guest writes are tracked while dirty logging is on.
public enum DirtyStrategy: String, Sendable, CaseIterable, CustomStringConvertible {
    /// Leaves write-protected; the first write to a 4 KiB page faults, marks it and makes it writable.
    /// A write to a protected block splits the block first.
    case writeProtect = "wp"
    /// As `writeProtect`, but blocks are split when logging starts (or when a range is cleared).
    case eagerSplit = "eager-split"
    /// Blocks stay mapped; a write to a protected block marks all its pages and unprotects it whole.
    case blockGranular = "block"
    /// 4 KiB leaves are writable-clean (DBM); the vCPU marks them dirty itself, without a fault.
    /// The harvest test-and-cleans leaves. Blocks still fault and split.
    case dbm
    /// Each vCPU appends newly dirtied pages to its own bounded ring.
    case ring

    public var description: String { rawValue }
}

/// Dirty logging options for one slot, as KVM's dirty-log capabilities.
public struct DirtyLogConfig: Sendable, Equatable {
    public var strategy: DirtyStrategy
    /// getDirtyLog does not re-protect; clearDirtyLog re-protects the pages it names.
    public var manualProtect: Bool
    /// Enabling reports every page dirty and protects nothing yet (needs manualProtect).
    public var initiallySet: Bool

    public init(strategy: DirtyStrategy, manualProtect: Bool = false, initiallySet: Bool = false) {
        self.strategy = strategy
        self.manualProtect = manualProtect
        self.initiallySet = initiallySet
    }

    /// Why this combination cannot log, on any backend: initially-all-set needs manual protect (as
    /// KVM_DIRTY_LOG_INITIALLY_SET does), and a ring is harvested and reset, never got and cleared, so
    /// neither option means anything for it (KVM ignores them silently; we refuse).
    public var problem: DirtyLogError? {
        if strategy == .ring && (manualProtect || initiallySet) { return .ringTakesNoManualProtect }
        if initiallySet && !manualProtect { return .initiallySetNeedsManualProtect }
        return nil
    }
}

public enum DirtyLogError: Error, Equatable, CustomStringConvertible {
    case memory(GuestMemoryError)
    case notLogging(slot: Int)
    case alreadyLogging(slot: Int)
    case readOnlySlot(Int)
    case loggingSlot(Int)
    case readOnlyAndLogging(Int)
    case vmmWriteToReadOnly(Int)
    case initiallySetNeedsManualProtect
    case ringTakesNoManualProtect
    case clearOutOfRange(slot: Int, firstPage: UInt64, pages: UInt64, slotPages: UInt64)
    case unalignedClear(firstPage: UInt64)
    case outsideGuestMemory(GPA, length: Int)

    public var description: String {
        switch self {
        case let .memory(e): return e.description
        case let .notLogging(s): return "memslot \(s) is not dirty logging: enable logging first"
        case let .alreadyLogging(s): return "memslot \(s) is already dirty logging: disable it before changing the strategy"
        case let .readOnlySlot(s): return "memslot \(s) is read-only: the guest cannot dirty it, so there is nothing to log"
        case let .loggingSlot(s): return "memslot \(s) is dirty logging: stop logging before making it read-only"
        case let .readOnlyAndLogging(s):
            return "memslot \(s) cannot be read-only and dirty logging at once: the guest cannot dirty a read-only slot"
        case let .vmmWriteToReadOnly(s): return "memslot \(s) is read-only: the VMM's writes are refused as the guest's are"
        case .initiallySetNeedsManualProtect: return "initially-all-set needs manual protect (as KVM_DIRTY_LOG_INITIALLY_SET does)"
        case .ringTakesNoManualProtect:
            return "dirty rings are harvested and reset, not got and cleared: manual protect and initially-all-set apply to the bitmap strategies only"
        case let .clearOutOfRange(s, f, n, total):
            return "clear of \(n) pages from page \(f) is outside memslot \(s), which has \(total) pages"
        case let .unalignedClear(f): return "clear must start at a multiple of 64 pages (got page \(f))"
        case let .outsideGuestMemory(g, n): return "\(n) bytes at \(g) are not all inside one memslot"
        }
    }
}
