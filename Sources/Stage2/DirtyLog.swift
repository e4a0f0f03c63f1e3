import Foundation
import DirtyLog
import GuestMemory
import Synchronization

/// The dirty state of one logging memslot.
public final class SlotDirtyLog: @unchecked Sendable {   // `slot` changes only under the MMU lock held exclusively
    /// The slot as it is now (a move changes its range). Guarded by the MMU lock.
    @exclusivity(unchecked) public internal(set) var slot: Memslot   // the lock is the check; faults read it
    public let config: DirtyLogConfig
    /// The strategy's answers to the MMU's questions.
    public let tracker: any DirtyTracker
    /// The answers a write fault needs, read from the tracker once: a fault pays no existential call.
    let usesRings: Bool
    let splitOnWrite: (set: UInt64, clear: UInt64)?
    /// Pages dirtied by faults, by the VMM's own writes, and drained from rings.
    public let bitmap: DirtyBitmap
    /// Split tables taken from the cache by eager splitting.
    public internal(set) var splitTablesUsed = 0

    init(slot: Memslot, config: DirtyLogConfig) {
        self.slot = slot
        self.config = config
        self.tracker = config.strategy.tracker
        usesRings = tracker.usesRings
        splitOnWrite = tracker.splitOnWrite
        self.bitmap = DirtyBitmap(pages: slot.pageCount)
    }

    public var strategy: DirtyStrategy { config.strategy }
}

/// One entry of a dirty ring: a page of a memslot.
public struct DirtyRingEntry: Hashable, Sendable {
    public var slot: Int
    public var page: UInt64
    public init(slot: Int, page: UInt64) {
        self.slot = slot
        self.page = page
    }
}

/// A vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING): the vCPU pushes each page it newly dirties; the VMM
/// harvests entries, then a reset re-protects the harvested pages and frees their room. A full ring
/// stops the vCPU until a reset frees room.
///
/// One producer (the vCPU, lock-free: it writes the entry, then publishes the index with release
/// ordering) and consumers serialized by a lock, as KVM's ring shared with user space.
public final class DirtyRing: @unchecked Sendable {   // single producer (its vCPU), single consumer (harvest); indices atomic
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
        // Left untouched: entries are plain values, written before they are read, so a ring's pages
        // are committed only as it fills (a VM that never logs into rings pays nothing for them).
        slots = .allocate(capacity: size)
    }

    deinit { slots.deallocate() }

    /// Entries pushed since the ring was made.
    public var pushedTotal: Int { pushed.load(ordering: .acquiring) }

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
