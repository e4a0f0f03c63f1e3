/// Memslot flags, as KVM_MEM_READONLY and KVM_MEM_LOG_DIRTY_PAGES.
public struct MemslotFlags: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Guest writes exit to the VMM instead of reaching memory.
    public static let readOnly = MemslotFlags(rawValue: 1 << 0)
    /// Guest writes are recorded in the slot's dirty log.
    public static let dirtyLogging = MemslotFlags(rawValue: 1 << 1)

    public var description: String {
        var parts: [String] = []
        if contains(.readOnly) { parts.append("read-only") }
        if contains(.dirtyLogging) { parts.append("dirty-logging") }
        return parts.isEmpty ? "rw" : parts.joined(separator: ",")
    }
}

/// A contiguous guest-physical range backed by one contiguous host range.
/// A plain value with no references, so the fault path can look one up without reference counting;
/// the host mapping object itself is owned by the MemslotTable.
@frozen
public struct Memslot: Sendable, Hashable, CustomStringConvertible {
    public var id: Int
    public var gpaRange: GPARange
    /// Host address of the first byte of the slot.
    public var hvaStart: HVA
    public var backing: Backing
    public var flags: MemslotFlags

    @inlinable public var size: UInt64 { gpaRange.size }
    @inlinable public var pageCount: UInt64 { size >> PageSize.shift4K }
    /// Whether page `page` (counted from the slot's start) lies inside the slot.
    @inlinable public func contains(page: UInt64) -> Bool { page < pageCount }
    @inlinable public var firstGFN: GFN { gpaRange.start.gfn }
    @inlinable public var hvaRange: HVARange { HVARange(start: hvaStart, size: size) }

    @inlinable @inline(__always)
    public func hva(for gpa: GPA) -> HVA { hvaStart + (gpa - gpaRange.start) }

    /// The guest-physical range whose host pages fall inside `r`, if any.
    public func gpaRange(overlapping r: HVARange) -> GPARange? {
        let lo = max(r.start, hvaStart), hi = min(r.end, hvaRange.end)
        guard lo < hi else { return nil }
        let start = gpaRange.start + (lo - hvaStart)
        return GPARange(start: start, size: hi - lo)
    }

    public var description: String {
        "slot \(id) \(gpaRange) \(formatBytes(size)) \(backing) \(flags)"
    }
}
