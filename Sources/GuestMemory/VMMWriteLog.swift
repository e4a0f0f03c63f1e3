import Foundation
import Synchronization

/// The pages the VMM itself wrote into logging memslots (device emulation, a loader, pages put back
/// after a failed snapshot), per slot, until a dirty-log get reports them. A hypervisor logs only its
/// guest's writes, so both backends keep this one log beside their own and merge it into every get.
/// Pages count from the slot's start, so a moved slot keeps its log.
public final class VMMWriteLog: Sendable {
    private let logs = Mutex<[Int: DirtyBitmap]>([:])

    public init() {}

    /// Starts logging slot `id` of `pages` pages (a slot already logging keeps its pages).
    public func start(slot id: Int, pages: UInt64) {
        logs.withLock { if $0[id] == nil { $0[id] = DirtyBitmap(pages: pages) } }
    }

    /// Stops logging slot `id`; what it had not reported goes.
    public func stop(slot id: Int) { logs.withLock { $0[id] = nil } }

    /// Records a write of `length` bytes at byte `offset` of slot `id`, if it logs.
    public func record(slot id: Int, offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        logs.withLock { logs in
            guard let log = logs[id] else { return }
            let first = offset >> 12
            log.set(first: first, count: min(log.pages, (offset + length - 1) >> 12 + 1) - first)
        }
    }

    /// Puts pages back (bit i of word w = page 64w + i of the slot); pages beyond the slot, or of a
    /// slot not logging, are dropped.
    public func mark(slot id: Int, bitmap: [UInt64]) { logs.withLock { $0[id] }?.set(bitmap: bitmap) }

    /// Marks single pages (dirty-ring entries) of logging slots; entries beyond their slot are dropped.
    public func mark(_ entries: [(slot: Int, page: UInt64)]) {
        logs.withLock { logs in
            for e in entries {
                guard let log = logs[e.slot], e.page < log.pages else { continue }
                log.set(e.page)
            }
        }
    }

    /// ORs slot `id`'s pages into `words`: taken away, or with `keep` (manual protect) left until a
    /// `forget` names them. Returns how many there were.
    @discardableResult
    public func report(slot id: Int, keep: Bool, into words: inout [UInt64]) -> Int {
        logs.withLock { logs in
            guard let log = logs[id] else { return 0 }
            if keep {
                log.copy(into: &words)
                return log.count
            }
            return log.harvest(into: &words)
        }
    }

    /// Forgets the pages `bitmap` names, its bit 0 being page `firstPage` (a clear).
    public func forget(slot id: Int, bitmap: [UInt64], firstPage: UInt64) {
        logs.withLock { $0[id]?.clear(bitmap: bitmap, firstPage: firstPage) }
    }
}
