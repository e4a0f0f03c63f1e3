/// The guest-physical memory map: memslots sorted by address, found by binary search.
///
/// A value type: whoever owns the current table (the MMU) swaps in a new one under its write lock,
/// so readers holding the old value never see a half-updated map.
public struct MemslotTable: Sendable {
    public let ipaBits: Int
    public let maxSlots: Int
    /// Sorted by gpaRange.start; ranges never overlap.
    public private(set) var slots: [Memslot] = []
    /// The host mappings, by slot id. Kept apart from `slots` so lookups copy no references.
    public private(set) var memories: [Int: HostMemory] = [:]

    public static let defaultMaxSlots = 512

    public init(ipaBits: Int = 48, maxSlots: Int = defaultMaxSlots) {
        precondition(ipaBits == 39 || ipaBits == 48, "IPA size must be 39 or 48 bits")
        self.ipaBits = ipaBits
        self.maxSlots = maxSlots
    }

    public var ipaLimit: UInt64 { 1 << UInt64(ipaBits) }
    public var totalBytes: UInt64 { slots.reduce(0) { $0 + $1.size } }

    /// The slot containing `gpa`, in O(log n).
    @inlinable
    public func lookup(_ gpa: GPA) -> Memslot? {
        var lo = 0, hi = slots.count
        while lo < hi {
            let mid = (lo + hi) >> 1
            let s = slots[mid]
            if gpa < s.gpaRange.start { hi = mid } else if gpa >= s.gpaRange.end { lo = mid + 1 } else { return s }
        }
        return nil
    }

    public func slot(id: Int) -> Memslot? { slots.first { $0.id == id } }

    public func memory(forSlot id: Int) -> HostMemory? { memories[id] }

    /// Adds a slot backed by `memory` starting at `memoryOffset`.
    @discardableResult
    public mutating func add(id: Int, gpa: GPA, size: UInt64, memory: HostMemory, memoryOffset: UInt64 = 0,
                             flags: MemslotFlags = []) throws(GuestMemoryError) -> Memslot {
        guard slot(id: id) == nil else { throw .duplicateSlot(id) }
        guard slots.count < maxSlots else { throw .tooManySlots(limit: maxSlots) }
        let range = try validate(gpa: gpa, size: size, excluding: nil)
        guard memoryOffset % PageSize.bytes4K == 0 else {
            throw .unalignedSize(memoryOffset, alignment: PageSize.bytes4K)
        }
        guard memoryOffset <= memory.size, size <= memory.size - memoryOffset else {
            throw .backingTooSmall(slotSize: size, backingSize: memory.size - min(memoryOffset, memory.size))
        }
        let s = Memslot(id: id, gpaRange: range, hvaStart: memory.base + memoryOffset,
                        backing: memory.backing, flags: flags)
        insert(s)
        memories[id] = memory
        return s
    }

    /// Removes a slot and returns it; the caller unmaps its range.
    @discardableResult
    public mutating func delete(id: Int) throws(GuestMemoryError) -> Memslot {
        guard let i = slots.firstIndex(where: { $0.id == id }) else { throw .noSuchSlot(id) }
        memories[id] = nil
        return slots.remove(at: i)
    }

    /// Moves a slot to a new guest-physical base, keeping its host memory (KVM_MR_MOVE).
    /// Returns the slot as it was, so the caller can unmap the old range.
    @discardableResult
    public mutating func move(id: Int, to gpa: GPA) throws(GuestMemoryError) -> Memslot {
        guard let i = slots.firstIndex(where: { $0.id == id }) else { throw .noSuchSlot(id) }
        let old = slots[i]
        let range = try validate(gpa: gpa, size: old.size, excluding: id)
        slots.remove(at: i)
        var s = old
        s.gpaRange = range
        insert(s)
        return old
    }

    /// Replaces a slot's flags; returns the slot as it was.
    @discardableResult
    public mutating func setFlags(id: Int, _ flags: MemslotFlags) throws(GuestMemoryError) -> Memslot {
        guard let i = slots.firstIndex(where: { $0.id == id }) else { throw .noSuchSlot(id) }
        let old = slots[i]
        slots[i].flags = flags
        return old
    }

    /// Every slot whose host range overlaps `r`, with the guest-physical part that does.
    public func slots(overlapping r: HVARange) -> [(slot: Memslot, gpa: GPARange)] {
        slots.compactMap { s in s.gpaRange(overlapping: r).map { (s, $0) } }
    }

    private func validate(gpa: GPA, size: UInt64, excluding: Int?) throws(GuestMemoryError) -> GPARange {
        guard size > 0 else { throw .zeroSize }
        guard gpa.isAligned(to: PageSize.bytes4K) else { throw .unalignedGPA(gpa, alignment: PageSize.bytes4K) }
        guard size % PageSize.bytes4K == 0 else { throw .unalignedSize(size, alignment: PageSize.bytes4K) }
        let (end, overflow) = gpa.raw.addingReportingOverflow(size)
        let range = GPARange(start: gpa, end: GPA(overflow ? .max : end))
        guard !overflow, end <= ipaLimit else { throw .beyondIPA(range, ipaBits: ipaBits) }
        if let other = slots.first(where: { $0.id != excluding && $0.gpaRange.overlaps(range) }) {
            throw .overlap(range, slot: other.id, existing: other.gpaRange)
        }
        return range
    }

    private mutating func insert(_ s: Memslot) {
        let i = slots.firstIndex { $0.gpaRange.start > s.gpaRange.start } ?? slots.count
        slots.insert(s, at: i)
    }
}
