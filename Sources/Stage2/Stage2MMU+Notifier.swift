import Foundation
import DirtyLog
import GuestMemory
import Synchronization

/// The MMU notifier: host memory changing under guest mappings.
extension Stage2MMU {
    /// Host memory in `range` is about to change: unmap every guest mapping of it and make racing
    /// faults retry until `invalidateRangeEnd`.
    public func invalidateRangeStart(_ range: HVARange) {
        lock.lockExclusive()
        defer { lock.unlock() }
        invalidatesInProgress += 1
        invalidateRange = invalidatesInProgress == 1 ? range
            : HVARange(start: min(invalidateRange.start, range.start), end: max(invalidateRange.end, range.end))
        var v = UnmapVisitor(changes: changeHook)
        for (_, gpaRange) in slotTable.slots(overlapping: range) { _ = walk(gpaRange, shared: false, &v) }
        commit(v.changes)
        reclaim()
    }

    public func invalidateRangeEnd(_ range: HVARange) {
        lock.lockExclusive()
        defer { lock.unlock() }
        invalidateSeq.add(1, ordering: .releasing)
        invalidatesInProgress -= 1
        if invalidatesInProgress == 0 { invalidateRange = HVARange(start: HVA(.max), end: HVA(0)) }
    }

    /// The notifier's sequence count (completed invalidations).
    public var invalidationSequence: UInt64 { invalidateSeq.load(ordering: .acquiring) }

    /// Discards the host pages behind part of a slot (MADV_DONTNEED, or hole punching for memfd),
    /// wrapped in an invalidation so no vCPU keeps a mapping of the old pages.
    public func discard(slot id: Int, offset: UInt64, length: UInt64) throws(GuestMemoryError) {
        let (slot, memory) = lock.shared { (slotTable.slot(id: id), slotTable.memory(forSlot: id)) }
        guard let slot, let memory else { throw .noSuchSlot(id) }
        guard offset % PageSize.bytes4K == 0 else { throw .unalignedSize(offset, alignment: PageSize.bytes4K) }
        guard length % PageSize.bytes4K == 0, length > 0 else { throw .unalignedSize(length, alignment: PageSize.bytes4K) }
        guard offset + length <= slot.size else { throw .backingTooSmall(slotSize: offset + length, backingSize: slot.size) }
        let range = HVARange(start: slot.hvaStart + offset, size: length)
        invalidateRangeStart(range)
        defer { invalidateRangeEnd(range) }
        try memory.discard(offset: slot.hvaStart - memory.base + offset, length: length)
    }
}
