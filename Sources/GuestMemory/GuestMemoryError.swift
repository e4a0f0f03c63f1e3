import Glibc

/// Every way guest memory set-up can fail, each with what was wrong and what to do.
public enum GuestMemoryError: Error, Equatable, CustomStringConvertible {
    case zeroSize
    case unalignedGPA(GPA, alignment: UInt64)
    case unalignedSize(UInt64, alignment: UInt64)
    case beyondIPA(GPARange, ipaBits: Int)
    case overlap(GPARange, slot: Int, existing: GPARange)
    case tooManySlots(limit: Int)
    case noSuchSlot(Int)
    case duplicateSlot(Int)
    case backingTooSmall(slotSize: UInt64, backingSize: UInt64)
    case hugePagesNotReserved(pageSize: UInt64, requested: UInt64, sysctl: String)
    case hugePageSizeMismatch(size: UInt64, pageSize: UInt64)
    case systemCall(String, errno: Int32)
    case badLayout(String)

    public var description: String {
        switch self {
        case .zeroSize:
            return "memslot size is zero: give a size of at least 4 KiB"
        case let .unalignedGPA(gpa, a):
            return "guest-physical address \(hex(gpa.raw)) is not aligned to \(formatBytes(a)): align it to a multiple of \(formatBytes(a))"
        case let .unalignedSize(s, a):
            return "size \(s) bytes is not a multiple of \(formatBytes(a)): round it to a multiple of \(formatBytes(a))"
        case let .beyondIPA(r, bits):
            return "guest-physical range \(r) ends beyond the \(bits)-bit IPA space (limit \(hex(1 << UInt64(bits)))): place it lower or configure a 48-bit IPA"
        case let .overlap(r, slot, e):
            return "guest-physical range \(r) overlaps memslot \(slot) at \(e): choose a free range or delete slot \(slot) first"
        case let .tooManySlots(limit):
            return "too many memslots (limit \(limit)): delete one or merge adjacent slots"
        case let .noSuchSlot(id):
            return "there is no memslot \(id)"
        case let .duplicateSlot(id):
            return "memslot \(id) already exists: delete it first or choose another id"
        case let .backingTooSmall(s, b):
            return "memslot of \(formatBytes(s)) does not fit its host backing of \(formatBytes(b))"
        case let .hugePagesNotReserved(ps, req, sysctl):
            return "no \(formatBytes(ps)) huge pages reserved for \(formatBytes(req)) of guest memory: reserve at least \(req / ps) with `echo \(req / ps) > \(sysctl)` (as root), or use --backing 4k|thp"
        case let .hugePageSizeMismatch(s, ps):
            return "size \(formatBytes(s)) is not a multiple of the \(formatBytes(ps)) huge page size: round it up"
        case let .systemCall(name, e):
            return "\(name) failed: \(String(cString: strerror(e))) (errno \(e))"
        case let .badLayout(why):
            return "memory layout: \(why)"
        }
    }
}
