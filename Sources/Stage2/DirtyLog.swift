import Foundation
import GuestMemory
import Synchronization

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
}

public enum DirtyLogError: Error, Equatable, CustomStringConvertible {
    case memory(GuestMemoryError)
    case notLogging(slot: Int)
    case alreadyLogging(slot: Int)
    case readOnlySlot(Int)
    case loggingSlot(Int)
    case initiallySetNeedsManualProtect
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
        case .initiallySetNeedsManualProtect: return "initially-all-set needs manual protect (as KVM_DIRTY_LOG_INITIALLY_SET does)"
        case let .clearOutOfRange(s, f, n, total):
            return "clear of pages \(f)..<\(f + n) is outside memslot \(s), which has \(total) pages"
        case let .unalignedClear(f): return "clear must start at a multiple of 64 pages (got page \(f))"
        case let .outsideGuestMemory(g, n): return "\(n) bytes at \(g) are not all inside one memslot"
        }
    }
}

/// The dirty state of one logging memslot.
public final class SlotDirtyLog: @unchecked Sendable {
    public let slot: Memslot
    public let config: DirtyLogConfig
    /// Pages dirtied by faults, by the VMM's own writes, and drained from rings.
    public let bitmap: DirtyBitmap
    /// Split tables taken from the cache by eager splitting.
    public internal(set) var splitTablesUsed = 0

    init(slot: Memslot, config: DirtyLogConfig) {
        self.slot = slot
        self.config = config
        self.bitmap = DirtyBitmap(pages: slot.pageCount)
    }

    public var strategy: DirtyStrategy { config.strategy }
}

/// One entry of a dirty ring: a page of a memslot.
public struct DirtyRingEntry: Hashable, Sendable {
    public var slot: Int
    public var page: UInt64
}

/// A vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING): the vCPU pushes each page it newly dirties; the VMM
/// harvests entries, then a reset re-protects the harvested pages and frees their room. A full ring
/// stops the vCPU until a reset frees room.
///
/// One producer (the vCPU, lock-free: it writes the entry, then publishes the index with release
/// ordering) and consumers serialized by a lock, as KVM's ring shared with user space.
public final class DirtyRing: @unchecked Sendable {
    public let capacity: Int
    /// The ring may overrun `capacity` by one block's pages: the full check comes before a write is
    /// allowed, the push after it (KVM's soft limit below the hard size).
    static let slack = 512
    private let slots: UnsafeMutablePointer<DirtyRingEntry>
    private let size: Int
    private let pushed = Atomic<Int>(0)     // written by the producer only
    private let freed = Atomic<Int>(0)      // written by reset only
    private let consumer = Mutex<Int>(0)    // harvested index
    private let room = NSCondition()

    public init(capacity: Int = 4096) {
        precondition(capacity > 0)
        self.capacity = capacity
        size = capacity + Self.slack
        slots = .allocate(capacity: size)
        slots.initialize(repeating: DirtyRingEntry(slot: 0, page: 0), count: size)
    }

    deinit { slots.deallocate() }

    /// Entries pushed and not yet reset.
    public var count: Int { pushed.load(ordering: .acquiring) - freed.load(ordering: .acquiring) }

    /// Full: the vCPU must exit before dirtying another page.
    var isSoftFull: Bool { count >= capacity }

    /// Producer only.
    @inline(__always)
    func push(_ e: DirtyRingEntry) {
        let n = pushed.load(ordering: .relaxed)
        precondition(n - freed.load(ordering: .acquiring) < size, "dirty ring overran its hard size")
        slots[n % size] = e
        pushed.store(n + 1, ordering: .releasing)
    }

    /// Appends the entries pushed since the last harvest to `out` (reuse `out` across harvests: on a
    /// host where first-touching fresh memory is slow, a new large array per harvest costs more than
    /// the harvest).
    func harvest(into out: inout [DirtyRingEntry]) -> Int {
        consumer.withLock { h in
            let end = pushed.load(ordering: .acquiring)
            for i in h..<end { out.append(slots[i % size]) }
            defer { h = end }
            return end - h
        }
    }

    /// Calls `body` with every entry harvested and not yet reset; returns the index it stopped at,
    /// to pass to `reset(upTo:)` (a harvest in between must not be freed unprotected).
    func forEachHarvested(_ body: (DirtyRingEntry) -> Void) -> Int {
        consumer.withLock { h in
            for i in freed.load(ordering: .relaxed)..<h { body(slots[i % size]) }
            return h
        }
    }

    /// Frees the room of the entries before `end` (their pages re-protected by the caller) and wakes
    /// a waiting vCPU. Returns how many were freed.
    func reset(upTo end: Int) -> Int {
        let n = consumer.withLock { _ -> Int in
            let old = freed.load(ordering: .relaxed)
            guard end > old else { return 0 }
            freed.store(end, ordering: .releasing)
            return end - old
        }
        room.lock(); room.broadcast(); room.unlock()
        return n
    }

    /// Waits until the ring has room or `timeout` seconds pass. True if there is room.
    public func waitForRoom(timeout: Double) -> Bool {
        let until = Date(timeIntervalSinceNow: timeout)
        room.lock()
        defer { room.unlock() }
        while count >= capacity {
            if !room.wait(until: until) { return count < capacity }
        }
        return true
    }
}
