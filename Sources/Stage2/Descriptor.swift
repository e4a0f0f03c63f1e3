import GuestMemory

/// A 64-bit stage-2 descriptor, laid out after the arm64 VMSAv8-64 stage-2 format (4 KiB granule).
///
/// ```
///  bit  0      VALID
///  bit  1      TABLE at levels 0-2 (points to the next-level table); PAGE at level 3.
///              With VALID set and bit 1 clear at level 1 or 2 the entry is a BLOCK (1 GiB / 2 MiB).
///  bit  6      S2AP[0]  R   read allowed
///  bit  7      S2AP[1]  W   write allowed
///  bit 10      AF          access flag, set by the vCPU's walk on first use (software-managed here)
///  bits 12-47  OA          output address: the host virtual address of the page / block / next table
///  bit 51      DBM         dirty-bit modifier: a write to a W=0, DBM=1 leaf sets W instead of faulting
///  bit 53      X           execute allowed (arm64 has XN, execute-never; we store the positive sense)
///  bit 55      SW_LOGGED   software: W was removed by dirty logging, so a write fault is a logging fault
///  bit 56      SW_DIRTY    software: the leaf was written since the dirty-log harvest (block-granular)
///  bit 57      SW_SPLIT    software: the leaf came from splitting a block (collapse candidate)
///  bit 58      SW_LOCKED   software: entry is held by a break-before-make in a shared walk (VALID clear)
/// ```
/// Everything else is zero. An all-zero descriptor is invalid (unmapped).
@frozen
public struct Descriptor: Hashable, Sendable, CustomStringConvertible {
    public var raw: UInt64
    @inlinable @inline(__always) public init(raw: UInt64) { self.raw = raw }

    public static let valid: UInt64 = 1 << 0
    public static let tableOrPage: UInt64 = 1 << 1
    public static let read: UInt64 = 1 << 6
    public static let write: UInt64 = 1 << 7
    public static let accessFlag: UInt64 = 1 << 10
    public static let dbm: UInt64 = 1 << 51
    public static let execute: UInt64 = 1 << 53
    public static let swLogged: UInt64 = 1 << 55
    public static let swDirty: UInt64 = 1 << 56
    public static let swSplit: UInt64 = 1 << 57
    public static let swLocked: UInt64 = 1 << 58
    public static let addressMask: UInt64 = 0x0000_FFFF_FFFF_F000
    /// Attribute bits a leaf carries; a split copies them to every smaller leaf.
    public static let attributeMask: UInt64 = read | write | accessFlag | dbm | execute | swLogged | swDirty | swSplit

    public static let invalid = Descriptor(raw: 0)
    /// The marker a shared walk installs while it breaks an entry: invalid to the vCPUs, "busy" to walkers.
    public static let locked = Descriptor(raw: swLocked)

    @inlinable @inline(__always) public var isValid: Bool { raw & Self.valid != 0 }
    @inlinable @inline(__always) public var isLocked: Bool { raw & Self.swLocked != 0 }
    @inlinable @inline(__always) public func isTable(level: Int) -> Bool {
        level < 3 && raw & (Self.valid | Self.tableOrPage) == (Self.valid | Self.tableOrPage)
    }
    @inlinable @inline(__always) public func isLeaf(level: Int) -> Bool { isValid && !isTable(level: level) }
    @inlinable @inline(__always) public var output: HVA { HVA(raw & Self.addressMask) }
    @inlinable @inline(__always) public var permissions: Permissions { Permissions(descriptor: raw) }
    @inlinable @inline(__always) public func has(_ bits: UInt64) -> Bool { raw & bits == bits }

    @inlinable @inline(__always) public func setting(_ bits: UInt64) -> Descriptor { Descriptor(raw: raw | bits) }
    @inlinable @inline(__always) public func clearing(_ bits: UInt64) -> Descriptor { Descriptor(raw: raw & ~bits) }

    /// A leaf at `level` mapping `output` with `attributes` (permission and software bits).
    @inlinable @inline(__always)
    public static func leaf(_ output: HVA, level: Int, attributes: UInt64) -> Descriptor {
        let typeBits = level == 3 ? valid | tableOrPage : valid
        return Descriptor(raw: (output.raw & addressMask) | (attributes & attributeMask) | typeBits)
    }

    /// A table descriptor pointing at the next-level table at host address `table`.
    @inlinable @inline(__always)
    public static func table(_ table: UnsafeMutableRawPointer) -> Descriptor {
        Descriptor(raw: (UInt64(UInt(bitPattern: table)) & addressMask) | valid | tableOrPage)
    }

    @inlinable @inline(__always) public var tablePointer: DescriptorTable {
        DescriptorTable(UnsafeMutableRawPointer(bitPattern: UInt(raw & Self.addressMask))!)
    }

    public var description: String {
        if raw == 0 { return "invalid" }
        if isLocked { return "locked" }
        var s = isValid ? (has(Self.tableOrPage) ? "table/page" : "block") : "invalid"
        s += " oa=0x" + String(raw & Self.addressMask, radix: 16) + " "
        s += has(Self.read) ? "r" : "-"
        s += has(Self.write) ? "w" : "-"
        s += has(Self.execute) ? "x" : "-"
        if has(Self.accessFlag) { s += " af" }
        if has(Self.dbm) { s += " dbm" }
        if has(Self.swLogged) { s += " logged" }
        if has(Self.swDirty) { s += " dirty" }
        if has(Self.swSplit) { s += " split" }
        return s
    }
}

/// Access permissions of a leaf or requested by an access.
public struct Permissions: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// Permission bits sit at the descriptor's own R/W/X positions, so conversion is a mask.
    @inlinable @inline(__always) public init(descriptor: UInt64) {
        rawValue = descriptor & (Descriptor.read | Descriptor.write | Descriptor.execute)
    }
    public static let read = Permissions(rawValue: Descriptor.read)
    public static let write = Permissions(rawValue: Descriptor.write)
    public static let execute = Permissions(rawValue: Descriptor.execute)
    public static let readWrite: Permissions = [.read, .write]
    public static let all: Permissions = [.read, .write, .execute]

    public var description: String {
        (contains(.read) ? "r" : "-") + (contains(.write) ? "w" : "-") + (contains(.execute) ? "x" : "-")
    }
}

/// Kind of guest access.
@frozen
public enum AccessKind: Sendable, Hashable, CustomStringConvertible {
    case read, write, execute
    @inlinable public var required: Permissions {
        switch self {
        case .read: return .read
        case .write: return .write
        case .execute: return .execute
        }
    }
    public var description: String {
        switch self {
        case .read: return "read"
        case .write: return "write"
        case .execute: return "execute"
        }
    }
}
