import Foundation

// Typed addresses. A guest-physical address, a guest frame number and a host virtual address are
// different things; giving each its own type keeps a GPA from being passed where an HVA is expected.

/// Guest-physical address.
@frozen
public struct GPA: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var raw: UInt64
    @inlinable @inline(__always) public init(_ raw: UInt64) { self.raw = raw }

    @inlinable @inline(__always) public var gfn: GFN { GFN(raw >> PageSize.shift4K) }
    @inlinable @inline(__always) public var pageOffset: UInt64 { raw & (PageSize.bytes4K - 1) }
    @inlinable @inline(__always) public func isAligned(to size: UInt64) -> Bool { raw & (size - 1) == 0 }
    @inlinable @inline(__always) public func alignedDown(to size: UInt64) -> GPA { GPA(raw & ~(size - 1)) }
    @inlinable @inline(__always) public static func + (a: GPA, b: UInt64) -> GPA { GPA(a.raw &+ b) }
    /// Distance in bytes from `b` to `a` (a >= b).
    @inlinable @inline(__always) public static func - (a: GPA, b: GPA) -> UInt64 { a.raw &- b.raw }
    @inlinable public static func < (a: GPA, b: GPA) -> Bool { a.raw < b.raw }
    public var description: String { "gpa:" + hex(raw) }
}

/// Guest frame number: a GPA divided by 4 KiB.
@frozen
public struct GFN: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var raw: UInt64
    @inlinable @inline(__always) public init(_ raw: UInt64) { self.raw = raw }
    @inlinable @inline(__always) public var gpa: GPA { GPA(raw << PageSize.shift4K) }
    @inlinable @inline(__always) public static func + (a: GFN, b: UInt64) -> GFN { GFN(a.raw &+ b) }
    @inlinable @inline(__always) public static func - (a: GFN, b: GFN) -> UInt64 { a.raw &- b.raw }
    @inlinable public static func < (a: GFN, b: GFN) -> Bool { a.raw < b.raw }
    public var description: String { "gfn:" + hex(raw) }
}

/// Host virtual address in this process.
@frozen
public struct HVA: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var raw: UInt64
    @inlinable @inline(__always) public init(_ raw: UInt64) { self.raw = raw }
    @inlinable @inline(__always) public init(_ pointer: UnsafeMutableRawPointer) {
        self.raw = UInt64(UInt(bitPattern: pointer))
    }
    @inlinable @inline(__always) public var pointer: UnsafeMutableRawPointer {
        UnsafeMutableRawPointer(bitPattern: UInt(raw))!
    }
    @inlinable @inline(__always) public func isAligned(to size: UInt64) -> Bool { raw & (size - 1) == 0 }
    @inlinable @inline(__always) public static func + (a: HVA, b: UInt64) -> HVA { HVA(a.raw &+ b) }
    @inlinable @inline(__always) public static func - (a: HVA, b: HVA) -> UInt64 { a.raw &- b.raw }
    @inlinable public static func < (a: HVA, b: HVA) -> Bool { a.raw < b.raw }
    public var description: String { "hva:" + hex(raw) }
}

/// A half-open range of guest-physical addresses.
@frozen
public struct GPARange: Hashable, Sendable, CustomStringConvertible {
    public var start: GPA
    public var end: GPA
    @inlinable public init(start: GPA, end: GPA) { self.start = start; self.end = end }
    @inlinable public init(start: GPA, size: UInt64) { self.start = start; self.end = start + size }
    @inlinable public var size: UInt64 { end - start }
    @inlinable public var isEmpty: Bool { end.raw <= start.raw }
    @inlinable public func contains(_ a: GPA) -> Bool { a >= start && a < end }
    @inlinable public func overlaps(_ o: GPARange) -> Bool { start < o.end && o.start < end }
    @inlinable public func clamped(to o: GPARange) -> GPARange {
        GPARange(start: max(start, o.start), end: min(end, o.end))
    }
    public var description: String { "[\(hex(start.raw)), \(hex(end.raw)))" }
}

/// A half-open range of host virtual addresses.
@frozen
public struct HVARange: Hashable, Sendable, CustomStringConvertible {
    public var start: HVA
    public var end: HVA
    @inlinable public init(start: HVA, end: HVA) { self.start = start; self.end = end }
    @inlinable public init(start: HVA, size: UInt64) { self.start = start; self.end = start + size }
    @inlinable public var size: UInt64 { end - start }
    @inlinable public func overlaps(_ o: HVARange) -> Bool { start < o.end && o.start < end }
    public var description: String { "[\(hex(start.raw)), \(hex(end.raw)))" }
}

/// The three mapping sizes of a 4 KiB-granule stage-2 table.
@frozen
public enum PageSize: Int, Sendable, CaseIterable, CustomStringConvertible, Comparable {
    case size4K = 0, size2M = 1, size1G = 2

    public static let shift4K: UInt64 = 12
    public static let bytes4K: UInt64 = 1 << 12
    public static let bytes2M: UInt64 = 1 << 21
    public static let bytes1G: UInt64 = 1 << 30

    @inlinable public var shift: UInt64 { 12 + 9 * UInt64(rawValue) }
    @inlinable public var bytes: UInt64 { 1 << shift }
    @inlinable public var pages4K: UInt64 { bytes >> 12 }
    /// Stage-2 level whose leaves have this size (3, 2 or 1).
    @inlinable public var level: Int { 3 - rawValue }
    @inlinable public init?(level: Int) {
        guard (1...3).contains(level) else { return nil }
        self.init(rawValue: 3 - level)
    }
    public static func < (a: PageSize, b: PageSize) -> Bool { a.rawValue < b.rawValue }
    public var description: String { ["4K", "2M", "1G"][rawValue] }
}

@usableFromInline
func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

/// Human-readable byte count: 4096 -> "4 KiB", 1.5 GiB -> "1.5 GiB".
public func formatBytes(_ v: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var x = Double(v)
    var u = 0
    while x >= 1024 && u < units.count - 1 { x /= 1024; u += 1 }
    if x == x.rounded() { return "\(Int(x)) \(units[u])" }
    return String(format: "%.1f %@", x, units[u])
}

/// Parses "4096", "4K", "2M", "1G", "512MiB" (binary units). Returns nil on anything else.
/// `v` exactly, in the largest unit `parseByteCount` reads that divides it: 3G, 1536M, 12K, 100.
public func exactByteCount(_ v: UInt64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] where v != 0 && v % (1 << UInt64(shift)) == 0 {
        return "\(v >> UInt64(shift))\(unit)"
    }
    return String(v)
}

public func parseByteCount(_ text: String) -> UInt64? {
    var s = text.trimmingCharacters(in: .whitespaces).uppercased()
    if s.hasSuffix("IB") { s.removeLast(2) } else if s.hasSuffix("B") && s.count > 1 { s.removeLast() }
    var shift: UInt64 = 0
    switch s.last {
    case "K": shift = 10
    case "M": shift = 20
    case "G": shift = 30
    case "T": shift = 40
    default: break
    }
    if shift != 0 { s.removeLast() }
    guard let n = UInt64(s) else { return nil }
    let (r, o) = n.multipliedReportingOverflow(by: 1 << shift)
    return o ? nil : r
}
